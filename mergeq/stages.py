"""Incremental stages: a stage whose inputs, options and tool versions hash the same is skipped.

Each stage writes its output directory atomically, then a stamp `OUT/.mergeq/stages/NAME.json` holding
the input key and the sha256 of every output file. A stage is done only when its stamp matches its key
and its files still hash as stamped; a run killed at any moment therefore redoes at most the stage it
was in, and leaves nothing that looks finished.

Within `file_stamps(...)`, every hash goes through a `FileStamps` cache: a file whose size, times and inode
are as last seen is not read again (`OUT/.mergeq/filestamps.json`), so skipping a finished 70B pipeline
costs a stat per file, not a re-read of every byte. Inputs outside OUT are also looked up in, and recorded to,
the cache every run and merge shares (`<cache>/stamps/inputs.json`): a new output directory does not read the
base again. `verify=True` reads everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mergeq.core import hashing
from mergeq.core.atomic import write_json
from mergeq.core.errors import MergeqError
from mergeq.core.hashing import FileStamps
from mergeq.core.locks import exclusive

log = logging.getLogger(__name__)

STATE_DIR = ".mergeq"
STAMPS_NAME = "filestamps.json"


@contextlib.contextmanager
def file_stamps(out_root: Path, *, verify: bool = False, name: str | None = None):
    """Hash through a FileStamps cache kept in OUT/.mergeq/ while the block runs (one run holds the lock): every
    `hashing.file_digest` in this process, the merge's and the exporters' manifests included; `name`: a cache of
    its own (`.mergeq/stamps/NAME.json`), for one stage that may run beside others."""
    path = Path(out_root) / STATE_DIR / (STAMPS_NAME if name is None else f"stamps/{name}.json")
    shared = hashing.shared_stamps(verify)
    with hashing.stamps_active(FileStamps(path, verify=verify, shared=shared, own=out_root)) as stamps:
        yield stamps
        stamps.save()
        stamps.save_shared()
        log.info("up-to-date checks: %s", stamps.summary())


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file under `root` but mergeq's own state, through the run's FileStamps."""
    return hashing.tree_hashes(root, skip=(STATE_DIR,))


def stage_key(name: str, inputs: dict, options: dict, versions: dict) -> str:
    blob = json.dumps(
        {"stage": name, "inputs": inputs, "options": options, "versions": versions}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Stage:
    name: str
    output: Path  # the directory (or file) the stage produces
    key: str

    def stamp_path(self, out_root: Path) -> Path:
        return Path(out_root) / STATE_DIR / "stages" / f"{self.name}.json"

    def is_done(self, out_root: Path) -> bool:
        stamp = self.stamp_path(out_root)
        if not stamp.exists() or not self.output.exists():
            return False
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if recorded.get("key") != self.key:
            return False
        return recorded.get("files") == tree_hashes(self.output)

    def mark_done(self, out_root: Path) -> None:
        write_json(self.stamp_path(out_root), {"stage": self.name, "key": self.key, "files": tree_hashes(self.output)})

    def clear(self, out_root: Path) -> None:
        self.stamp_path(out_root).unlink(missing_ok=True)


def run_lock(out_root: Path):
    """An exclusive lock on an output directory: a second `mergeq run` on it refuses, clearly."""
    out_root = Path(out_root)
    return exclusive(
        out_root / STATE_DIR / "lock",
        refuse=lambda holder: MergeqError(
            f"another mergeq run (pid {holder}) is writing to {out_root}",
            hint="wait for it to finish, or choose another --out directory",
        ),
    )
