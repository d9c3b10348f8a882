"""The streaming engine: one decoder layer in memory at a time, for any decoder-only family transformers
defines (mergeq/core/skeleton.py builds the model on the meta device and fills one layer at a time).

1. The model's own forward runs over the calibration tokens with its decoder layers replaced by recorders:
   the first layer's inputs, and what every layer receives (position embeddings, masks, cache positions).
2. For each decoder layer: materialize it from the memory-mapped safetensors, find its linears and the
   order the forward uses them (hooks; linears reading the same input form one unit, a fused experts module
   is one unit), quantize it, hand its tensors to the sink (which writes them under the checkpoint's names),
   free it, and pass its outputs on.
3. The remaining tensors (final norm, lm_head) are copied through unquantized.

Peak memory is one layer plus the calibration activations, whatever the depth. Each finished layer is saved
(exporters/int4/resume.py), so a killed export resumes at the next layer.

This module is the loop. A layer's units and the capture of their inputs: exporters/int4/layer.py; the RTN,
GPTQ and AWQ passes over one layer: exporters/int4/passes.py.
Left in full precision: everything outside the layers (lm_head), routers and gates, user-excluded patterns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from exporters.int4.checkpoint import TensorSource
from exporters.int4.families import Family, family_of, require_awq
from exporters.int4.layer import EngineOptions, LayerContext
from exporters.int4.passes import quantize_layer
from exporters.int4.quant import QuantizedLinear
from exporters.int4.resume import LayerCheckpoints, LayerOutput
from mergeq.core.device import resolve_device
from mergeq.core.errors import MergeqError
from mergeq.core.memory import release_freed_memory
from mergeq.core.modelfiles import read_model_config
from mergeq.core.progress import track
from mergeq.core.skeleton import LayerCall, Skeleton

log = logging.getLogger(__name__)

__all__ = ["Sink", "StreamResult", "quantize_streaming"]

CHUNK_TOKENS = 4096  # calibration tokens pushed through a layer at once (the engine's own setting, not an option)


class Sink(Protocol):
    def linear(self, name: str, quantized: QuantizedLinear) -> None: ...

    def tensor(self, name: str, tensor: torch.Tensor) -> None: ...

    def tensor_parts(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], parts: Iterator[torch.Tensor]
    ) -> None: ...


@dataclass
class StreamResult:
    layers: int
    seconds: float
    layer_info: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def quantize_streaming(
    model_dir: Path,
    tokens: torch.Tensor | None,
    options: EngineOptions,
    sink: Sink,
    output_dtype: torch.dtype = torch.float16,
    checkpoints: LayerCheckpoints | None = None,
) -> StreamResult:
    """Quantize every decoder layer of `model_dir` and send every output tensor to `sink`.

    `tokens`: calibration samples [N, L] (None for RTN, which needs none). `checkpoints`: where each finished
    layer is saved; layers already saved there for the same inputs are replayed, not recomputed."""
    started = time.perf_counter()
    config = read_model_config(model_dir)
    family = family_of(config)
    if options.method == "awq":
        require_awq(family)
    device = resolve_device(options.given.device)
    source = TensorSource(model_dir)
    skeleton = Skeleton(model_dir, source, device, family.experts)
    needs_data = options.method != "rtn"
    if needs_data and tokens is None:
        raise MergeqError(f"{options.method} needs calibration samples")

    hidden: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in range(skeleton.count)]
    if needs_data:
        per_chunk = max(1, CHUNK_TOKENS // tokens.shape[1])
        hidden, calls = skeleton.capture(tokens, per_chunk)

    prefixes = tuple(skeleton.layer_prefix(i) for i in range(skeleton.count))
    for name in source.names():
        if not name.startswith(prefixes):
            if name.startswith(skeleton.prefix):
                raise MergeqError(f"tensor {name} belongs to no decoder layer in 0..{skeleton.count - 1}")
            # a piece at a time: the embedding and lm_head (1 GiB each at Llama-3.1-8B's vocabulary) are never
            # whole in memory, nor their mapped pages
            stored = source.dtype(name)
            dtype = output_dtype if stored.is_floating_point else stored
            sink.tensor_parts(name, dtype, tuple(source.shape(name)), _output_parts(source, name, dtype))

    layers = skeleton.count
    result = StreamResult(layers=layers, seconds=0.0)
    skip = checkpoints.start() if checkpoints is not None else 0
    if skip and needs_data and skip < layers:
        hidden = [h.to(device) for h in checkpoints.hidden(skip - 1)]
    for index in track(range(layers), f"{options.method} layers"):
        prefix = skeleton.layer_prefix(index)
        if index < skip:  # done by an earlier, killed run with the same inputs: the same bytes, replayed
            _send(sink, checkpoints.load(index), prefix, result)
            continue
        layer = skeleton.load_layer(index)
        ctx = LayerContext(
            options=options, family=family, calls=calls[index] if needs_data else None, layer_index=index, prefix=prefix
        )
        source.close()  # unmap what this layer read, so resident memory stays one layer deep
        outputs, quantized, info = quantize_layer(layer, hidden, ctx)
        done = LayerOutput(quantized={skeleton.disk_name(n): _to_cpu(q) for n, q in quantized.items()}, info=info)
        owned = {f"{name}.{p}" for name in quantized for p in ("weight", "bias")}
        if family.experts:
            owned |= {f"{family.experts.module}.gate_up_proj", f"{family.experts.module}.down_proj"}
        for name, tensor in layer.state_dict().items():
            if name not in owned:
                disk = skeleton.disk_name(name)
                done.tensors[disk] = _to_output(tensor, prefix + disk, output_dtype)
        _send(sink, done, prefix, result)
        if checkpoints is not None:
            checkpoints.save(index, done, outputs)
        hidden = outputs
        calls[index] = []
        del layer, outputs, quantized, done
        release_freed_memory()  # glibc keeps freed heap pages: RSS grew 70 MB per layer without this
    source.close()
    if checkpoints is not None:
        checkpoints.finish()
    result.warnings = _warnings(result.layer_info, family, options.method)
    result.seconds = time.perf_counter() - started
    return result


def _send(sink: Sink, done: LayerOutput, prefix: str, result: StreamResult) -> None:
    for name, q in done.quantized.items():
        sink.linear(prefix + name, q)
    for name, tensor in done.tensors.items():
        sink.tensor(prefix + name, tensor)
    result.layer_info.append(done.info)


def _warnings(layer_info: list[dict], family: Family, method: str) -> list[str]:
    warnings = [
        f"decoder layer {index}: experts {info['idle_experts']} received no calibration tokens and were "
        "rounded to nearest (pass more or more varied calibration text)"
        for index, info in enumerate(layer_info)
        if info.get("idle_experts")
    ]
    notes = sorted({why for info in layer_info for why in info.get("not_folded", {}).values()})
    warnings += [f"AWQ: {why}" for why in notes]
    if method == "awq":
        warnings += [f"AWQ: {note}" for note in family.awq_notes]
    return warnings


def _to_cpu(q: QuantizedLinear) -> QuantizedLinear:
    return QuantizedLinear(
        codes=q.codes.cpu(),
        scales=q.scales.cpu(),
        zeros=q.zeros.cpu(),
        g_idx=q.g_idx.cpu(),
        bias=None if q.bias is None else q.bias.cpu(),
    )


def _to_output(tensor: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    converted = tensor.to(dtype)
    if not torch.isfinite(converted).all() and torch.isfinite(tensor).all():
        _overflow(name, dtype, float(tensor.abs().max()))
    return converted


def _output_parts(source: TensorSource, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """`_to_output` of a stored tensor, a flat piece at a time (each piece used before the next is read)."""
    for piece in source.chunks(name):
        if piece.dtype == dtype:
            yield piece
            continue
        converted = piece.to(dtype)
        if not torch.isfinite(converted).all() and torch.isfinite(piece).all():
            finite = all(bool(torch.isfinite(p).all()) for p in source.chunks(name))
            if finite:  # the same test as _to_output's on the whole tensor
                _overflow(name, dtype, max(float(p.abs().max()) for p in source.chunks(name)))
        yield converted


def _overflow(name: str, dtype: torch.dtype, largest: float) -> None:
    raise MergeqError(
        f"tensor {name} overflows {dtype} (largest magnitude {largest:g})",
        hint="vLLM's int4 kernels run in float16; this checkpoint's values do not fit",
    )
