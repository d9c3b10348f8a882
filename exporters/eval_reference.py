"""The reference's log-probabilities, computed once per (reference files, tokens, context, device type) and cached as
full-vocabulary fp32 log-probabilities of the scored positions under `cache_root()/eval/`, one file per window."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from exporters import eval_torch
from exporters.eval_options import EvalOptions
from mergeq.core.atomic import atomic_dir, write_json
from mergeq.core.hashing import file_digest
from mergeq.core.locks import exclusive
from mergeq.core.metrics import Windows

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_KEEP = 3  # reference cache entries kept (newest used first); each is n_scored x vocab x 4 bytes
EVICT_AFTER = 3600  # seconds: an entry used more recently is never evicted (another run may be reading it)


@dataclass
class ReferenceLogprobs:
    """Cached fp32 log-probabilities of the reference at every scored position, one file per window."""

    directory: Path
    n_windows: int

    def window(self, i: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.directory / f"window-{i:04d}.safetensors"), framework="pt") as handle:
            return handle.get_tensor("logprobs")


def _tokens_sha(windows: Windows) -> str:
    digest = hashlib.sha256(windows.tokens.numpy().tobytes())
    digest.update(windows.targets.numpy().tobytes())
    return digest.hexdigest()


def reference_key(reference: Path, windows: Windows, options: EvalOptions) -> dict:
    """What a cached reference depends on: its files, the tokens, the context and the device type it ran on."""
    from mergeq.core.device import resolve_device

    return {
        "version": CACHE_VERSION,
        "reference": checkpoint_fingerprint(reference),
        "tokens": _tokens_sha(windows),
        "n_ctx": windows.n_ctx,
        "torch": torch.__version__,
        # the forward passes sum in another order on a GPU: a CUDA run's scores never mix with a CPU reference
        "device": resolve_device(options.device).type,
    }


def reference_logprobs(reference: Path, windows: Windows, options: EvalOptions) -> ReferenceLogprobs:
    """The reference's log-probabilities for these windows: from the cache, or computed once and cached."""
    from safetensors.torch import save_file

    key_data = reference_key(reference, windows, options)
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:32]
    root = options.resolved_cache()
    entry = root / f"ref-{key}"
    with exclusive(root / f"ref-{key}.lock", f"another process is computing the reference {reference}; waiting"):
        if (entry / "meta.json").is_file():
            os.utime(entry / "meta.json")
            log.info("reference log-probs from cache %s", entry)
        else:
            with atomic_dir(entry) as tmp:
                label = f"reference {Path(reference).name}"
                for i, lp in eval_torch.model_logprobs(reference, "hf", windows, options, label):
                    save_file({"logprobs": lp.contiguous()}, str(tmp / f"window-{i:04d}.safetensors"))
                write_json(
                    tmp / "meta.json", {**key_data, "reference_path": str(reference), "windows": windows.n_windows}
                )
    _evict(root)
    return ReferenceLogprobs(entry, windows.n_windows)


def _evict(root: Path) -> None:
    """Keep the CACHE_KEEP most recently used references, and any used in the last EVICT_AFTER seconds."""
    entries = [p for p in root.glob("ref-*") if p.is_dir() and (p / "meta.json").is_file()]
    entries.sort(key=lambda p: (p / "meta.json").stat().st_mtime, reverse=True)
    now = time.time()
    for old in entries[CACHE_KEEP:]:
        if now - (old / "meta.json").stat().st_mtime > EVICT_AFTER:
            shutil.rmtree(old, ignore_errors=True)
            (root / f"{old.name}.lock").unlink(missing_ok=True)


@functools.lru_cache(maxsize=16)
def _fingerprint_cached(directory: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in stamp:
        digest.update(name.encode() + b"\0" + file_digest(Path(directory) / name).encode() + b"\n")
    return digest.hexdigest()


def checkpoint_fingerprint(directory: Path) -> str:
    """sha256 over the weight files and config.json of a checkpoint (memoized per size and mtime)."""
    directory = Path(directory).resolve()
    names = sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    )
    stamp = tuple((n, (directory / n).stat().st_size, (directory / n).stat().st_mtime_ns) for n in names)
    return _fingerprint_cached(str(directory), stamp)
