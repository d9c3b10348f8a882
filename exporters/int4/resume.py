"""Per-layer checkpoints of a streaming int4 run, so that a killed run resumes at the next layer.

After decoder layer i is quantized, three things are enough to go on without redoing layers 0..i:
what layer i gave the sink (its quantized linears and its other tensors, in order), the hidden states that
flow into layer i+1, and the layer's info for the report. They are written to `layer-<i>.safetensors` and
`hidden-<i>.safetensors`; then `state.json` is replaced in one rename to say "i+1 layers done". A kill at any
moment leaves either the old state (the new files are ignored and rewritten) or the new one.

The directory belongs to one set of inputs: `state.json` records a key over the model's file stamps, the
calibration tokens, the engine options, the device, and the torch thread count and CPU kernel set
(mergeq.core.device.arithmetic_key). A directory with another key is cleared before use: a resume never
splices layers of another run into this one. The replayed tensors are the exact bytes computed before
(safetensors round-trips every dtype), and the hidden states are kept in fp32, so a resumed run writes the
same files as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from exporters.int4.quant import QuantizedLinear
from mergeq.core.atomic import atomic_file, write_json
from mergeq.core.device import arithmetic_key

log = logging.getLogger(__name__)

STATE = "state.json"
_FIELDS = ("codes", "scales", "zeros", "g_idx", "bias")


@dataclass
class LayerOutput:
    """What one decoder layer sent to the sink, in the order it sent it."""

    quantized: dict[str, QuantizedLinear] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def inputs_key(model_dir: Path, tokens: torch.Tensor | None, options: dict) -> str:
    """A key over everything a layer's result depends on. The model is identified by the stat stamps of its files
    (size, mtime, inode: a rewritten file is renamed into place, so it gets a new inode), as make does."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file():
            st = path.stat()
            digest.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    if tokens is not None:
        digest.update(str(tuple(tokens.shape)).encode())
        digest.update(tokens.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(json.dumps({**options, **arithmetic_key()}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class LayerCheckpoints:
    """The checkpoints of one streaming run in `directory`, valid for inputs with `key`."""

    def __init__(self, directory: Path, key: str, layers: int):
        self.directory, self.key, self.layers = Path(directory), key, layers

    # ------------------------------------------------------------------ reading

    def done(self) -> int:
        """How many layers are checkpointed for this key (0 when none, or when the directory is another run's)."""
        try:
            state = json.loads((self.directory / STATE).read_text())
        except (OSError, ValueError):
            return 0
        if state.get("key") != self.key or state.get("layers") != self.layers:
            return 0
        done = int(state.get("done", 0))
        missing = [i for i in range(done) if not self._layer_path(i).is_file()]
        if missing or (done and not self._hidden_path(done - 1).is_file() and done < self.layers):
            log.warning(
                "%s: checkpoint files are missing (layers %s); starting again from layer 0",
                self.directory,
                missing[:5] or [done - 1],
            )
            return 0
        return done

    def load(self, index: int) -> LayerOutput:
        path = self._layer_path(index)
        tensors = load_file(str(path))
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        meta = header.get("__metadata__", {})
        order = json.loads(meta["order"])
        out = LayerOutput(info=json.loads(meta["info"]))
        for kind, name in order:
            if kind == "q":
                parts = {f: tensors.get(f"q/{name}/{f}") for f in _FIELDS}
                out.quantized[name] = QuantizedLinear(**parts)
            else:
                out.tensors[name] = tensors[f"t/{name}"]
        return out

    def hidden(self, index: int) -> list[torch.Tensor]:
        """The hidden states that layer `index` produced (the inputs of layer index+1), as chunks."""
        tensors = load_file(str(self._hidden_path(index)))
        return [tensors[f"chunk.{i}"] for i in range(len(tensors))]

    # ------------------------------------------------------------------ writing

    def start(self) -> int:
        """Prepare the directory for this key; returns the number of layers to skip."""
        done = self.done()
        if done:
            log.info("int4: resuming after layer %d of %d from %s", done - 1, self.layers, self.directory)
            return done
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        write_json(self.directory / STATE, {"key": self.key, "layers": self.layers, "done": 0})
        return 0

    def save(self, index: int, output: LayerOutput, hidden: list[torch.Tensor]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        order: list[tuple[str, str]] = []
        for name, q in output.quantized.items():
            order.append(("q", name))
            for f in _FIELDS:
                value = getattr(q, f)
                if value is not None:
                    tensors[f"q/{name}/{f}"] = value.detach().cpu().contiguous()
        for name, tensor in output.tensors.items():
            order.append(("t", name))
            tensors[f"t/{name}"] = tensor.detach().cpu().contiguous()
        meta = {"order": json.dumps(order), "info": json.dumps(output.info, sort_keys=True, default=float)}
        with atomic_file(self._layer_path(index)) as handle:
            handle.write(save(tensors, metadata=meta))
        if hidden and index + 1 < self.layers:
            chunks = {f"chunk.{i}": h.detach().cpu().contiguous() for i, h in enumerate(hidden)}
            with atomic_file(self._hidden_path(index)) as handle:
                handle.write(save(chunks))
        write_json(self.directory / STATE, {"key": self.key, "layers": self.layers, "done": index + 1})
        if index > 0:
            self._hidden_path(index - 1).unlink(missing_ok=True)  # only the newest hidden states are needed

    def finish(self) -> None:
        """The run is complete: its checkpoints are no longer needed."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def _layer_path(self, index: int) -> Path:
        return self.directory / f"layer-{index:05d}.safetensors"

    def _hidden_path(self, index: int) -> Path:
        return self.directory / f"hidden-{index:05d}.safetensors"
