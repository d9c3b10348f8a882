"""The streamed forward (mergeq/core/streaming.py) over what the exporters write: `Int4Weights` reads an AWQ,
GPTQ or compressed-tensors folder under the original tensor names, unpacking int4 linears as they are read;
`streamed(folder, kind, ...)` opens a plain or int4 checkpoint folder for exporters/eval_torch.py."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from mergeq.core import streaming
from mergeq.core.streaming import CheckpointWeights, LayerHook


class Int4Weights(CheckpointWeights):
    """An AWQ / GPTQ / compressed-tensors folder seen under the original names: `...q_proj.weight` is
    unpacked from the packed tensors as written (exporters/int4/formats.py) when it is read, in fp32."""

    def __init__(self, folder: Path):
        from exporters.int4.formats import format_of, quantization_config_of

        super().__init__(folder)
        self.qconfig = quantization_config_of(self.folder)
        self.format = format_of(self.qconfig)
        stored = set(self.checkpoint.names())
        self._stored = stored
        suffix = "." + self.format.marker
        self.quantized = {n[: -len(suffix)] for n in stored if n.endswith(suffix)}
        owned = {n for n in stored if n.rpartition(".")[0] in self.quantized}
        plain = stored - owned
        plain |= {f"{p}.bias" for p in self.quantized if f"{p}.bias" in stored}
        self._names = sorted(plain | {f"{p}.weight" for p in self.quantized})

    def names(self) -> list[str]:
        return self._names

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def get(self, name: str) -> torch.Tensor:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight" and prefix in self.quantized:
            linear = self.format.read_linear(prefix, self.checkpoint.get, self.qconfig, self._stored)
            return linear.dequantize(torch.float32)
        return self.checkpoint.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight" and prefix in self.quantized:
            return tuple(self.get(name).shape)
        return super().shape(name)


def open_weights(folder: Path, kind: str) -> CheckpointWeights:
    """ "hf" or "int4" (the kinds of exporters.eval_inputs.detect_format)."""
    return Int4Weights(folder) if kind == "int4" else CheckpointWeights(folder)


@contextlib.contextmanager
def streamed(folder: Path, kind: str, device: torch.device, hook: LayerHook | None = None):
    """A StreamedModel of a checkpoint folder ("hf" or "int4"), closed on exit."""
    with streaming.streamed(open_weights(folder, kind), device, hook) as model:
        yield model
