"""Sharded safetensors output, written tensor by tensor as the merge produces them.

The shard layout is planned up front from the names, dtypes and shapes of every output tensor, so each
shard's header is known before its first tensor arrives and tensors go straight to disk. The bytes depend
only on the tensors and their order: no timestamps, sorted JSON, fixed padding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from merge.checkpoint import CODES, SAFETENSORS_INDEX, itemsize
from merge.options import DEFAULT_MAX_SHARD_BYTES
from mergeq.core.atomic import write_json


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[list[OutTensor]]:
    """Greedy, order-preserving split: a shard closes before the tensor that would push it past the limit."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _header_bytes(tensors: list[OutTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Write planned tensors in order; `finish()` checks that all arrived and writes the index."""

    def __init__(self, folder: Path, tensors: list[OutTensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.folder = Path(folder)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.names = [shard_name(i, len(self.shards)) for i in range(len(self.shards))]
        self._order = [(si, t) for si, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._handle = None
        self._open_shard = -1

    def expected_next(self) -> OutTensor | None:
        return self._order[self._next][1] if self._next < len(self._order) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned = self._begin(name)
        if planned.dtype != tensor.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(f"writer expected {planned.name} {planned.dtype} {planned.shape}, "
                               f"got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if planned.nbytes:
            self._put(tensor)
        self._next += 1

    def write_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Write one tensor given as consecutive flat pieces (row-major order), never whole in memory."""
        planned = self._begin(name)
        written = 0
        for part in parts:
            if part.dtype != planned.dtype:
                raise RuntimeError(f"writer expected {planned.dtype} pieces of {name}, got {part.dtype}")
            written += part.numel() * part.element_size()
            self._put(part)
        if written != planned.nbytes:
            raise RuntimeError(f"writer got {written} bytes for {name}, planned {planned.nbytes}")
        self._next += 1

    def _begin(self, name: str) -> OutTensor:
        if self._next >= len(self._order):
            raise RuntimeError(f"writer got unplanned tensor {name}")
        shard_index, planned = self._order[self._next]
        if planned.name != name:
            raise RuntimeError(f"writer expected {planned.name}, got {name}")
        if shard_index != self._open_shard:
            self._close_handle()
            self._handle = open(self.folder / self.names[shard_index], "wb")
            self._handle.write(_header_bytes(self.shards[shard_index]))
            self._open_shard = shard_index
        return planned

    def _put(self, tensor: torch.Tensor) -> None:
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(flat.numpy().data)

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            self._handle.close()
            self._handle = None

    def finish(self) -> dict:
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise RuntimeError(f"writer finished early: {missing} and {len(self._order) - self._next - 1} more missing")
        self._close_handle()
        for i, shard in enumerate(self.shards):  # a plan with no tensors still yields one valid (empty) shard
            if not shard:
                (self.folder / self.names[i]).write_bytes(_header_bytes([]))
        index = {
            "metadata": {"total_size": sum(t.nbytes for _, t in self._order)},
            "weight_map": {t.name: self.names[si] for si, t in self._order},
        }
        write_json(self.folder / SAFETENSORS_INDEX, index)
        return index

    def abort(self) -> None:
        self._close_handle()
