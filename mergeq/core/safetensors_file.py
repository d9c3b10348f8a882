"""One safetensors file, validated and read lazily.

Its header is checked before a single data byte is read: the length prefix, the JSON, each entry's dtype, shape and
byte range (inside the file, no overlaps, size == dtype * shape). Tensors are then read one at a time from a memory
map; the pages of a tensor are dropped from this process as soon as it is copied out, so reading a whole file never
makes the process hold more than one tensor's worth of it. Checkpoint folders (single, sharded, indexed, pickles):
mergeq/core/checkpoint.py.
"""

from __future__ import annotations

import json
import math
import mmap
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeq.core.errors import MergeqError

MAX_HEADER_BYTES = 100 * 1024 * 1024
CHUNK_BYTES = 4 * 1024 * 1024

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _bad(path: Path, what: str) -> MergeqError:
    return MergeqError(
        f"{path}: corrupt or truncated safetensors file: {what}",
        hint="re-download or re-save this file; mergeq checks the header before reading any tensor",
    )


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of one safetensors file. Returns (tensors by name, metadata)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise MergeqError(f"{path}: cannot read the file ({err.strerror})") from err
    if size < 8:
        raise _bad(path, f"the file has {size} bytes, fewer than the 8-byte header length")
    with open(path, "rb") as handle:
        n = int.from_bytes(handle.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise _bad(path, f"header length {n} bytes exceeds the 100 MB limit")
        if 8 + n > size:
            raise _bad(path, f"header length {n} bytes runs past the end of the {size}-byte file")
        raw = handle.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(path, f"the header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _bad(path, "__metadata__ is not an object")
    data_start = 8 + n
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _parse_entry(path, name, entry, data_start, data_size)
    spans = sorted((i.begin, i.end, i.name) for i in infos.values() if i.end > i.begin)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _bad(
                path,
                f"tensors {n0!r} and {n1!r} overlap (bytes {b0 - data_start}-{e0 - data_start} "
                f"and {b1 - data_start}-{e1 - data_start})",
            )
    return infos, {str(k): str(v) for k, v in metadata.items()}


def _parse_entry(path: Path, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    code = entry.get("dtype")
    if code not in DTYPES:
        raise _bad(path, f"tensor {name!r} has unknown dtype {code!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _bad(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise _bad(path, f"tensor {name!r} has data_offsets {offsets} that go backwards")
    if end > data_size:
        raise _bad(
            path, f"tensor {name!r} ends at byte {end} but the file holds only {data_size} data bytes (truncated file?)"
        )
    dtype = DTYPES[code]
    expected = math.prod(shape) * itemsize(dtype)
    if end - begin != expected:
        raise _bad(
            path,
            f"tensor {name!r} is {code} {shape}, which needs {expected} bytes, "
            f"but its data_offsets span {end - begin} bytes",
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


# the kernel maps a whole page-cache folio around a fault (up to 2 MiB: large folios, Linux 6.x), so reading a
# tensor also maps pages of its neighbours; released with it, they do not pile up (measured: +54 MiB mapped by
# the end of a 1 GB shard read tensor by tensor, 2 MiB with this margin)
FOLIO_MARGIN = 2 << 20


def _release_pages(mapped: mmap.mmap, begin: int, end: int) -> None:
    """Drop the pages of bytes [begin, end) of a read-only map from the process, and those the kernel may have
    mapped within FOLIO_MARGIN around them; they stay in the page cache and fault back in if read again."""
    page = mmap.PAGESIZE
    start = max(0, (begin - FOLIO_MARGIN) // page * page)
    try:
        mapped.madvise(mmap.MADV_DONTNEED, start, min(len(mapped), end + FOLIO_MARGIN) - start)
    except (OSError, ValueError, AttributeError):  # closed, or no madvise on this platform
        pass


class SafetensorsFile:
    """One validated safetensors file, memory-mapped lazily; `get` copies out one tensor and drops its pages."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors, self.metadata = read_safetensors_header(self.path)
        self._map: mmap.mmap | None = None
        self._viewed = False  # `view` handed out views of the current map: `close` must not unmap it

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh tensor (never a view of the file), converted to `dtype` if given."""
        info = self.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype or info.dtype)
        mapped = self._mapped()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the buffer is read-only; we copy before anyone can write
            view = torch.frombuffer(mapped, dtype=info.dtype, count=info.numel, offset=info.begin)
        out = view.reshape(info.shape).to(dtype or info.dtype, copy=True)
        del view
        self._drop(info)
        return out

    def view(self, name: str) -> tuple[torch.Tensor, Callable[..., None]] | None:
        """One tensor as a read-only view of the file map (no copy), and a function that releases its pages (or
        those of its bytes [first, last)) from this process: they stay in the page cache, and the view reads on,
        faulting them back in. None for an empty tensor. Callers must not write to the view. A view keeps its map
        alive after `close`: the map is unmapped when the last view goes."""
        info = self.tensors[name]
        if info.numel == 0:
            return None
        mapped = self._mapped()
        self._viewed = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            view = torch.frombuffer(mapped, dtype=info.dtype, count=info.numel, offset=info.begin)

        def release(first: int = 0, last: int | None = None) -> None:  # bytes [first, last) of the tensor
            _release_pages(mapped, info.begin + first, info.begin + (info.nbytes if last is None else last))

        return view.reshape(info.shape), release

    def chunks(self, name: str, max_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """Flat, read-only views of one tensor, `max_bytes` at a time, each dropped from memory after use.

        For copying a tensor through unchanged without ever holding all of it. Callers must not write to them.
        """
        info = self.tensors[name]
        size = itemsize(info.dtype)
        step = max(1, max_bytes // size)
        mapped = self._mapped() if info.numel else None
        for first in range(0, info.numel, step):
            count = min(step, info.numel - first)
            offset = info.begin + first * size
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                view = torch.frombuffer(mapped, dtype=info.dtype, count=count, offset=offset)
            yield view
            del view
            self._drop_range(offset, offset + count * size)

    def _drop(self, info: TensorInfo) -> None:
        self._drop_range(info.begin, info.end)

    def _drop_range(self, begin: int, end: int) -> None:
        """Release these pages from the process (they stay in the page cache)."""
        if self._map is not None and end > begin:
            _release_pages(self._map, begin, end)

    def close(self) -> None:
        if self._map is not None and not self._viewed:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a buffer of it; the map closes when it goes
                pass
        # a map that `view` handed out is only let go: torch.frombuffer keeps a reference to it, not a buffer
        # export, so closing it would unmap memory the views still read; it is unmapped when the last view goes
        self._map = None
        self._viewed = False
