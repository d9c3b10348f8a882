"""Lazy, validated access to checkpoint tensors: safetensors (single or sharded with an index) and `.bin` pickles.

Every safetensors header is checked before a single data byte is read: the length prefix, the JSON, each
entry's dtype, shape and byte range (inside the file, no overlaps, size == dtype * shape). Tensors are then read
one at a time from a memory map; the pages of a tensor are dropped from this process as soon as it is copied
out, so reading a whole checkpoint never makes the process hold more than one tensor's worth of it.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeq.core.errors import MergeqError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024
CHUNK_BYTES = 4 * 1024 * 1024
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

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


class SafetensorsFile:
    """One validated safetensors file, memory-mapped lazily; `get` copies out one tensor and drops its pages."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors, self.metadata = read_safetensors_header(self.path)
        self._map: mmap.mmap | None = None

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
        if self._map is None or not hasattr(self._map, "madvise") or end <= begin:
            return
        page = mmap.PAGESIZE
        start = (begin // page) * page
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the map closes when it goes
                pass
            self._map = None


def _safe_child(folder: Path, name: str, index_path: Path) -> Path:
    """Resolve a shard name from an index, refusing names that leave the checkpoint folder."""
    candidate = Path(name)
    if not name or candidate.is_absolute() or ".." in candidate.parts or "\\" in name:
        raise MergeqError(
            f"{index_path}: shard path {name!r} escapes the checkpoint folder {folder}",
            hint="an index may only name files inside its own folder; fix or re-save the checkpoint",
        )
    resolved = (folder / candidate).resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise MergeqError(
            f"{index_path}: shard path {name!r} resolves to {resolved}, outside the checkpoint folder {folder}",
            hint="an index may only name files inside its own folder (no symlinks out of it)",
        )
    return folder / candidate


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MergeqError(f"{index_path}: cannot read the shard index ({err})") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MergeqError(f"{index_path}: the index has no valid 'weight_map' object")
    return weight_map


class Checkpoint:
    """All tensors of a checkpoint folder, by name, without loading them.

    Safetensors (preferred): `model.safetensors` or an index plus shards; every header is validated on open.
    Pickles (`pytorch_model.bin`, sharded or not) are read only through `torch.load(weights_only=True)`, and a
    shard is loaded as a whole when first needed (pickles cannot be read tensor by tensor).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MergeqError(f"checkpoint folder {self.folder} does not exist or is not a folder")
        self.files: list[Path] = []
        self._where: dict[str, Path] = {}
        self._st: dict[Path, SafetensorsFile] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self.format = self._discover()

    def _discover(self) -> str:
        folder = self.folder
        if (folder / SAFETENSORS_INDEX).is_file():
            index_path = folder / SAFETENSORS_INDEX
            weight_map = _read_index(index_path)
            shards = {}
            for name in dict.fromkeys(weight_map.values()):
                shard = _safe_child(folder, name, index_path)
                if not shard.is_file():
                    raise MergeqError(
                        f"{index_path}: names shard {name!r}, which does not exist in {folder}",
                        hint="copy the missing shard or re-save the checkpoint",
                    )
                shards[name] = SafetensorsFile(shard)
            for tensor, name in weight_map.items():
                if tensor not in shards[name]:
                    raise MergeqError(f"{index_path}: says tensor {tensor!r} is in {name}, but that shard lacks it")
            for st in shards.values():
                self._st[st.path] = st
                self.files.append(st.path)
            # tensors in shard order, then by position in the file: reading is sequential
            for name, st in shards.items():
                for info in sorted(st.tensors.values(), key=lambda i: i.begin):
                    if weight_map.get(info.name) == name:
                        self._where[info.name] = st.path
            self.files.insert(0, index_path)
            return "safetensors"
        if (folder / SAFETENSORS_SINGLE).is_file():
            st = SafetensorsFile(folder / SAFETENSORS_SINGLE)
            self._st[st.path] = st
            self.files.append(st.path)
            for info in sorted(st.tensors.values(), key=lambda i: i.begin):
                self._where[info.name] = st.path
            return "safetensors"
        singles = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
        if len(singles) == 1:
            st = SafetensorsFile(singles[0])
            self._st[st.path] = st
            self.files.append(st.path)
            for info in sorted(st.tensors.values(), key=lambda i: i.begin):
                self._where[info.name] = st.path
            return "safetensors"
        if (folder / BIN_INDEX).is_file():
            index_path = folder / BIN_INDEX
            weight_map = _read_index(index_path)
            for tensor, name in weight_map.items():
                shard = _safe_child(folder, name, index_path)
                if not shard.is_file():
                    raise MergeqError(f"{index_path}: names shard {name!r}, which does not exist in {folder}")
                self._where[tensor] = shard
            self.files = [index_path, *dict.fromkeys(self._where.values())]
            return "bin"
        if (folder / BIN_SINGLE).is_file():
            shard = folder / BIN_SINGLE
            for tensor in self._load_bin(shard):
                self._where[tensor] = shard
            self.files = [shard]
            return "bin"
        raise MergeqError(
            f"no checkpoint in {folder}: expected model.safetensors, model.safetensors.index.json, "
            "or pytorch_model.bin",
            hint="point --base at a Hugging Face model folder",
        )

    def _load_bin(self, shard: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is not None and self._bin_cache[0] == shard:
            return self._bin_cache[1]
        self._bin_cache = None
        try:
            data = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for unsafe or corrupt pickles
            raise MergeqError(
                f"{shard}: cannot load with torch.load(weights_only=True): {str(err).splitlines()[0]}",
                hint="mergeq never unpickles arbitrary objects; convert the checkpoint to safetensors",
            ) from err
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise MergeqError(f"{shard}: not a state dict of tensors")
        self._bin_cache = (shard, data)
        return data

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        path = self._where[name]
        if path in self._st:
            info = self._st[path].tensors[name]
            return info.dtype, info.shape
        tensor = self._load_bin(path)[name]
        return tensor.dtype, tuple(tensor.shape)

    def chunks(self, name: str, max_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """Flat pieces of one tensor (views into the map for safetensors; pieces of the tensor for pickles)."""
        path = self._where[name]
        if path in self._st:
            self._unmap_others(path)
            yield from self._st[path].chunks(name, max_bytes)
            return
        flat = self._load_bin(path)[name].reshape(-1)
        step = max(1, max_bytes // flat.element_size())
        for first in range(0, flat.numel(), step):
            yield flat[first : first + step]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        path = self._where[name]
        if path in self._st:
            self._unmap_others(path)
            return self._st[path].get(name, dtype)
        return self._load_bin(path)[name].to(dtype or self._load_bin(path)[name].dtype, copy=True)

    def _unmap_others(self, path: Path) -> None:
        """Keep one shard mapped: pages madvise could not drop (shared with the page cache, partial pages at
        tensor edges) then stay one shard deep (measured: +48 MiB mapped over 24 more layers without this)."""
        for other, st in self._st.items():
            if other != path:
                st.close()

    def close(self) -> None:
        for st in self._st.values():
            st.close()
        self._bin_cache = None


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one small file (an adapter): safetensors validated first, `.bin` via weights_only."""
    path = Path(path)
    if path.suffix == ".safetensors":
        st = SafetensorsFile(path)
        try:
            return {name: st.get(name) for name in st.keys()}
        finally:
            st.close()
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise MergeqError(
            f"{path}: cannot load with torch.load(weights_only=True): {str(err).splitlines()[0]}",
            hint="mergeq never unpickles arbitrary objects; save the adapter as safetensors",
        ) from err
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise MergeqError(f"{path}: not a state dict of tensors")
    return dict(data)
