"""On-disk checkpoints: lazy, memory-mapped tensor access to a Hugging Face safetensors model, and a
sharded writer that never holds more than one shard of output in memory."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from merge.checkpoint import Checkpoint
from merge.writer import OutTensor, _header_bytes
from mergeq.core.atomic import write_json
from mergeq.core.errors import MergeqError

# Files a serving stack needs besides the weights: tokenizer, chat template, generation defaults.
AUXILIARY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise MergeqError(f"{path} not found",
                          hint="--model must be a Hugging Face checkpoint directory with config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MergeqError(f"{path} is not valid JSON: {exc}") from exc


class TensorSource:
    """Name -> tensor for a (possibly sharded) safetensors checkpoint, through merge.checkpoint.Checkpoint:
    headers validated up front, each read copies one tensor out of the map and drops its pages, so resident
    memory holds what the caller keeps, not what it has read."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._checkpoint = Checkpoint(self.model_dir)
        if self._checkpoint.format != "safetensors":
            raise MergeqError(
                f"no *.safetensors files in {self.model_dir}",
                hint="export the merged model with safetensors (save_pretrained(..., safe_serialization=True))",
            )

    def names(self) -> list[str]:
        return sorted(self._checkpoint.names())

    def __contains__(self, name: str) -> bool:
        return name in self._checkpoint

    def shape(self, name: str) -> list[int]:
        self._require(name)
        return list(self._checkpoint.info(name)[1])

    def get(self, name: str) -> torch.Tensor:
        self._require(name)
        return self._checkpoint.get(name)

    def _require(self, name: str) -> None:
        if name not in self._checkpoint:
            raise MergeqError(f"tensor {name!r} is missing from {self.model_dir}")

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self._checkpoint.files if f.suffix == ".safetensors")

    def close(self) -> None:
        """Unmap every file."""
        self._checkpoint.close()


class ShardWriter:
    """Collects output tensors and writes them as safetensors shards of at most `max_shard_bytes`.

    Shards are named model-0000i-of-0000n.safetensors (with model.safetensors.index.json), or
    model.safetensors when everything fits in one. Byte-identical for identical input. Each tensor's bytes go
    to a spill file on disk as it arrives (a shard's header is written, then the spill copied in behind it),
    so memory holds no shard: a 1 GiB shard once cost 1 GiB of RAM, more than the layer being quantized.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 1 << 30):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: list[OutTensor] = []
        self._pending_bytes = 0
        self._spill = None
        self._shards: list[list[str]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise MergeqError(f"tensor {name!r} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        if self._spill is None:
            self._spill = open(self._spill_path(len(self._shards)), "wb")
        if size:
            self._spill.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self._seen.add(name)
        self._pending.append(OutTensor(name, tensor.dtype, tuple(tensor.shape)))
        self._pending_bytes += size

    def _spill_path(self, index: int) -> Path:
        return self.out_dir / f".shard-{index:05d}.spill"

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self._shards)
        self._spill.close()
        self._spill = None
        spill = self._spill_path(index)
        ordered = sorted(self._pending, key=lambda t: t.name)  # the header lists names sorted, data in arrival order
        with open(self.out_dir / f".shard-{index:05d}.safetensors", "wb") as out, open(spill, "rb") as data:
            out.write(_header_bytes(self._pending))
            shutil.copyfileobj(data, out, 16 << 20)
        spill.unlink()
        self._shards.append([t.name for t in ordered])
        self.total_bytes += self._pending_bytes
        self._pending = []
        self._pending_bytes = 0

    def finish(self) -> list[Path]:
        self._flush()
        count = len(self._shards)
        if count == 1:
            final = self.out_dir / "model.safetensors"
            (self.out_dir / ".shard-00000.safetensors").rename(final)
            return [final]
        weight_map = {}
        paths = []
        for i, names in enumerate(self._shards):
            final = self.out_dir / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.out_dir / f".shard-{i:05d}.safetensors").rename(final)
            paths.append(final)
            for name in names:
                weight_map[name] = final.name
        write_json(
            self.out_dir / "model.safetensors.index.json",
            {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
        )
        return paths


def copy_auxiliary_files(model_dir: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer, chat template and generation config; return the names copied."""
    copied = []
    for name in AUXILIARY_FILES:
        source = Path(model_dir) / name
        if source.is_file():
            shutil.copyfile(source, Path(out_dir) / name)
            copied.append(name)
    return copied


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    source = TensorSource(model_dir)
    for name in source.names():
        yield name, source.get(name)
