"""All tensors of a checkpoint folder, by name, without loading them: safetensors (single, or sharded with an
index; each file validated and read lazily by mergeq/core/safetensors_file.py) and `.bin` pickles (read only through
`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mergeq.core.errors import MergeqError
from mergeq.core.safetensors_file import CHUNK_BYTES, SafetensorsFile

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


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
            self.files.append(index_path)
            for name, st in shards.items():
                self._add(st, {tensor for tensor, shard in weight_map.items() if shard == name})
            return "safetensors"
        if (folder / SAFETENSORS_SINGLE).is_file():
            singles = [folder / SAFETENSORS_SINGLE]
        else:
            singles = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
        if len(singles) == 1:
            self._add(SafetensorsFile(singles[0]))
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

    def _add(self, st: SafetensorsFile, owned: set[str] | None = None) -> None:
        """A safetensors file and its tensors (`owned`: those its index places there), in the order they lie in
        the file: reading is sequential."""
        self._st[st.path] = st
        self.files.append(st.path)
        for info in sorted(st.tensors.values(), key=lambda i: i.begin):
            if owned is None or info.name in owned:
                self._where[info.name] = st.path

    def _load_bin(self, shard: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is not None and self._bin_cache[0] == shard:
            return self._bin_cache[1]
        self._bin_cache = None
        data = _load_pickle(shard, "convert the checkpoint to safetensors", mmap=True)
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

    def view(self, name: str) -> tuple[torch.Tensor, Callable[..., None]] | None:
        """A read-only view of one tensor in its safetensors file and a function releasing its pages
        (SafetensorsFile.view); None for tensors of pickles and empty ones (use `get`)."""
        path = self._where[name]
        if path not in self._st:
            return None
        self._unmap_others(path)
        return self._st[path].view(name)

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
    return dict(_load_pickle(path, "save the adapter as safetensors"))


def _load_pickle(path: Path, what_to_do: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, through torch.load(weights_only=True) only."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - torch raises many types for unsafe or corrupt pickles
        raise MergeqError(
            f"{path}: cannot load with torch.load(weights_only=True): {str(err).splitlines()[0]}",
            hint=f"mergeq never unpickles arbitrary objects; {what_to_do}",
        ) from err
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise MergeqError(f"{path}: not a state dict of tensors")
    return data
