"""The sha256 of a merge's input files, for its manifest, read in a background thread.

`mergeq merge` starts them before it imports torch (mergeq/commands/merge.py): hashlib and file reads drop the
GIL, so a first merge of a base hashes it beside the imports and the checks, which run on one core, and not
beside the merge. A digest kept from an earlier merge or run is trusted while the file's size, times and inode
are unchanged (`<cache>/stamps/inputs.json`, mergeq.core.hashing.shared_stamps; `--verify` reads every file);
inside `mergeq run` the run's own stamp cache serves instead (mergeq.stages.file_stamps, which consults the
same shared one for inputs). No torch here: this module is imported first.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mergeq.core.hashing import FileStamps, file_digest, save_shared, shared_stamps, stamps_on, tree_hashes

log = logging.getLogger(__name__)


def input_folders(bases: Sequence[Path | str | None], adapters: Sequence[Path | str]) -> list[Path]:
    """The folders a merge hashes, in manifest order: the bases given (4-bit first), then the adapters."""
    return list(dict.fromkeys([Path(b) for b in bases if b is not None] + [Path(a) for a in adapters]))


def input_stamps(verify: bool) -> FileStamps | None:
    """The digest cache kept between merges and runs; None inside `mergeq run`, whose own cache serves."""
    if stamps_on():
        return None
    return shared_stamps(verify)


class InputDigests:
    """Every file directly in each folder hashed in one background thread, folder after folder. `stop()` ends it
    at its next 4 MiB (a refusal does not wait for a 16 GB base); `result()` waits for all of them."""

    def __init__(self, folders: list[Path], *, verify: bool = False):
        self.folders, self.verify = list(folders), verify
        self.kept = input_stamps(verify)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeq-hash")
        digest = functools.partial(self.kept.sha256 if self.kept is not None else file_digest, stop=self._stop)
        self._futures: dict[Path, Future] = {
            folder: self._pool.submit(tree_hashes, folder, recursive=False, digest=digest) for folder in self.folders
        }

    def serves(self, folders: list[Path], verify: bool) -> bool:
        """Whether these digests are the ones a merge of `folders` needs (started by the command for the same
        arguments, with the same cache in force)."""
        return self.folders == list(folders) and self.verify == verify and (self.kept is None) == stamps_on()

    def result(self) -> dict[Path, dict[str, str]]:
        return {folder: future.result() for folder, future in self._futures.items()}

    def stop(self) -> None:
        """Stop what is still being read and wait for the thread to end (at once if everything was read)."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def save(self) -> None:
        """Keep the digests for the next merge. The cache is a convenience: failing to write it warns only."""
        if self.kept is not None:
            save_shared(self.kept)
