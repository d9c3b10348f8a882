"""Sharded safetensors output: the one writer of model checkpoints (the merge, the int4 exporters).

Tensors go to disk as they arrive; memory never holds a shard. Two ways to feed it:
- with a plan (every output tensor's name, dtype and shape known up front, as the merge knows them): each
  shard's header is written when the shard opens and tensors stream straight behind it, whole or in flat
  pieces (`write`, `write_parts`); shards are always named model-0000i-of-0000n.safetensors, with an index;
- without one (`add`: the int4 exporters learn a tensor's shape only once it is quantized): each shard's data goes
  to a spill file until the shard is full, then its header is written and the spill copied in behind it;
  one shard is named model.safetensors (no index), several model-0000i-of-0000n.safetensors with an index.

A shard closes before the tensor that would push it past `max_shard_bytes`. The bytes depend only on the
tensors and their order: no timestamps, sorted JSON, fixed padding. Inside a `mergeq run` (a run's file stamps
active) each shard's sha256 is computed from the bytes as they are written and recorded
(`hashing.note_written`): the stage stamp then does not read the checkpoint back.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeq.core import hashing
from mergeq.core.atomic import write_json
from mergeq.core.checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from mergeq.core.errors import MergeqError
from mergeq.core.safetensors_file import CODES, itemsize

COPY_BYTES = 16 << 20  # a spilled shard is copied behind its header this many bytes at a time


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


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
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


def header_bytes(tensors: list[OutTensor]) -> bytes:
    """A safetensors header for these tensors, laid out in this order (8-byte length, JSON, space padding)."""
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


def _flat_bytes(tensor: torch.Tensor):
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data


class ShardWriter:
    """Write tensors in order into safetensors shards of at most `max_shard_bytes`; `finish()` checks that every
    planned tensor arrived, closes the last shard and writes the index. Returns the index (None: one unplanned
    shard, model.safetensors, needs none). `digests`: each shard's sha256 by file name, when `hash_shards`
    (default: inside a run)."""

    def __init__(
        self, folder: Path, max_shard_bytes: int, plan: list[OutTensor] | None = None, hash_shards: bool | None = None
    ):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.planned = plan is not None
        self.shards: list[list[OutTensor]] = plan_shards(plan, max_shard_bytes) if self.planned else []
        self.names = [shard_name(i, len(self.shards)) for i in range(len(self.shards))]
        self._order = [(si, t) for si, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._handle = None
        self._open_shard = -1
        self._pending: list[OutTensor] = []  # unplanned: the tensors of the shard being spilled
        self._pending_bytes = 0
        self._seen: set[str] = set()
        self.total_bytes = 0
        self.hash_shards = hashing.stamps_on() if hash_shards is None else hash_shards
        self._sha = None  # the open planned shard's digest, or None
        self._spilled: list[str] = []  # unplanned: each finished shard's digest, in order
        self.digests: dict[str, str] = {}

    # -- planned

    def expected_next(self) -> OutTensor | None:
        return self._order[self._next][1] if self._next < len(self._order) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next planned tensor, whole."""
        if not self.planned:
            raise RuntimeError("write needs a writer with a plan; add() appends without one")
        planned = self._begin(name)
        if planned.dtype != tensor.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(
                f"writer expected {planned.name} {planned.dtype} {planned.shape}, "
                f"got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        if planned.nbytes:
            self._put(_flat_bytes(tensor))
        self._next += 1

    def write_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """The next planned tensor as consecutive flat pieces (row-major order), never whole in memory."""
        if not self.planned:
            raise RuntimeError("write_parts needs a writer with a plan")
        planned = self._begin(name)
        written = 0
        for part in parts:
            if part.dtype != planned.dtype:
                raise RuntimeError(f"writer expected {planned.dtype} pieces of {name}, got {part.dtype}")
            written += part.numel() * part.element_size()
            self._put(_flat_bytes(part))
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
            self._sha = hashlib.sha256() if self.hash_shards else None
            self._open_shard = shard_index
            self._put(header_bytes(self.shards[shard_index]))
        return planned

    def _put(self, data) -> None:
        self._handle.write(data)
        if self._sha is not None:
            self._sha.update(data)

    # -- unplanned

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append a tensor to a writer without a plan (spilled until its shard is full)."""
        tensor = tensor.detach().to("cpu").contiguous()
        self.add_parts(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def add_parts(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], parts: Iterable[torch.Tensor]) -> None:
        """`add` for a tensor given as consecutive flat pieces (row-major order) of `dtype`, never whole in
        memory: the same bytes as `add` of the whole tensor."""
        if self.planned:
            raise RuntimeError(f"add({name!r}) on a writer with a plan; use write() or write_parts()")
        if name in self._seen:
            raise MergeqError(f"tensor {name!r} written twice")
        out = OutTensor(name, dtype, tuple(shape))
        if self._pending and self._pending_bytes + out.nbytes > self.max_shard_bytes:
            self._flush()
        if self._handle is None:
            self._handle = open(self._spill_path(len(self.shards)), "wb")
        written = 0
        for part in parts:
            if part.dtype != dtype:
                raise RuntimeError(f"writer expected {dtype} pieces of {name}, got {part.dtype}")
            written += part.numel() * part.element_size()
            if part.numel():
                self._handle.write(_flat_bytes(part))
        if written != out.nbytes:
            raise RuntimeError(f"writer got {written} bytes for {name}, expected {out.nbytes}")
        self._seen.add(name)
        self._pending.append(out)
        self._pending_bytes += out.nbytes

    def _spill_path(self, index: int) -> Path:
        return self.folder / f".shard-{index:05d}.spill"

    def _flush(self) -> None:
        """Header, then the spilled data behind it: one finished (temporarily named) shard."""
        if not self._pending:
            return
        index = len(self.shards)
        self._close_handle()
        spill = self._spill_path(index)
        sha = hashlib.sha256() if self.hash_shards else None
        with open(self.folder / f".shard-{index:05d}.safetensors", "wb") as out, open(spill, "rb") as data:
            block = header_bytes(self._pending)
            while block:
                out.write(block)
                if sha is not None:
                    sha.update(block)
                block = data.read(COPY_BYTES)
        spill.unlink()
        if sha is not None:
            self._spilled.append(sha.hexdigest())
        self.shards.append(self._pending)
        self.total_bytes += self._pending_bytes
        self._pending = []
        self._pending_bytes = 0

    # -- both

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            self._handle.close()
            self._handle = None
        if self._sha is not None:  # a planned shard, complete
            self.digests[self.names[self._open_shard]] = self._sha.hexdigest()
            self._sha = None

    def _note_digests(self) -> None:
        for name, digest in self.digests.items():
            hashing.note_written(self.folder / name, digest)

    def finish(self) -> dict | None:
        if not self.planned:
            return self._finish_unplanned()
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise RuntimeError(f"writer finished early: {missing} and {len(self._order) - self._next - 1} more missing")
        self._close_handle()
        for i, shard in enumerate(self.shards):  # a plan with no tensors still yields one valid (empty) shard
            if not shard:
                (self.folder / self.names[i]).write_bytes(header_bytes([]))
                if self.hash_shards:
                    self.digests[self.names[i]] = hashlib.sha256(header_bytes([])).hexdigest()
        self.total_bytes = sum(t.nbytes for _, t in self._order)
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {t.name: self.names[si] for si, t in self._order},
        }
        write_json(self.folder / SAFETENSORS_INDEX, index)
        self._note_digests()
        return index

    def _finish_unplanned(self) -> dict | None:
        self._flush()
        count = len(self.shards)
        self.names = [SAFETENSORS_SINGLE] if count == 1 else [shard_name(i, count) for i in range(count)]
        for i, name in enumerate(self.names):
            (self.folder / f".shard-{i:05d}.safetensors").rename(self.folder / name)
        self.digests = dict(zip(self.names, self._spilled, strict=True)) if self.hash_shards else {}
        self._note_digests()  # after the renames: a file's own rename changes its stamp
        if count == 1:
            return None
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard},
        }
        write_json(self.folder / SAFETENSORS_INDEX, index)
        return index

    def paths(self) -> list[Path]:
        return [self.folder / name for name in self.names]

    def abort(self) -> None:
        self._close_handle()
