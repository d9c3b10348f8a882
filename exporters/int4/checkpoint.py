"""The int4 engine's view of its input checkpoint: lazy, memory-mapped tensor access to a Hugging Face
safetensors model (mergeq.core.checkpoint underneath). Output goes through mergeq.core.shards.ShardWriter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from mergeq.core.checkpoint import Checkpoint
from mergeq.core.errors import MergeqError
from mergeq.core.streaming import row_blocks


class TensorSource:
    """Name -> tensor for a (possibly sharded) safetensors checkpoint, through mergeq.core.checkpoint.Checkpoint:
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

    def dtype(self, name: str) -> torch.dtype:
        self._require(name)
        return self._checkpoint.info(name)[0]

    def get(self, name: str) -> torch.Tensor:
        """A fresh copy of the whole tensor (for the 128k-row embeddings, 1 GiB and its mapped pages at once:
        use `chunks` or `row_blocks` where the whole is not needed)."""
        self._require(name)
        return self._checkpoint.get(name)

    def chunks(self, name: str) -> Iterator[torch.Tensor]:
        """Flat read-only pieces of one tensor in order, each dropped from memory after use."""
        self._require(name)
        return self._checkpoint.chunks(name)

    def row_blocks(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) of a 2-D tensor a block at a time: Skeleton.capture gathers the calibration
        tokens' embedding rows through it without reading the whole table."""
        self._require(name)
        return row_blocks(self._checkpoint, name)

    def _require(self, name: str) -> None:
        if name not in self._checkpoint:
            raise MergeqError(f"tensor {name!r} is missing from {self.model_dir}")

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self._checkpoint.files if f.suffix == ".safetensors")

    def close(self) -> None:
        """Unmap every file."""
        self._checkpoint.close()


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    source = TensorSource(model_dir)
    for name in source.names():
        yield name, source.get(name)
