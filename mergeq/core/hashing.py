"""sha256 of files, folders and texts, streamed so that large checkpoints never sit in memory; and `FileStamps`,
which remembers each file's digest against its stat so that an unchanged file is not read again.

`file_digest` is the digest every manifest and key uses: through the FileStamps cache a run made active
(`stamps_active`, opened by mergeq.stages.file_stamps), else read. One `mergeq run` so reads each file at most
once, however many stages and manifests ask for its digest: the base for the merge stage's key and for the merge
manifest, the merged checkpoint for its stage stamp, the GGUF manifest and the evaluation's reference key. The
checkpoints mergeq writes itself (merged, int4) are hashed as they are written (`note_written`), not read back.

Inputs (files outside a run's output directory) also have a cache shared by every run and merge on the machine
(`shared_stamps`: `<cache>/stamps/inputs.json`, the most recently used files): a base merged or exported before,
from any output directory, is not read again while its stamp is unchanged."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 22
SHARED_STAMPS = "stamps/inputs.json"  # under the cache root: input files' digests, kept between runs and merges
SHARED_STAMPS_KEPT = 4096  # files: the most recently used


class HashingStopped(Exception):
    """A digest was asked to stop (its `stop` event set) before the end of its file."""


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """sha256 of the file at `path`; with `stop`, checked every 4 MiB, raising HashingStopped once it is set
    (a digest running in the background of work that failed is not waited for)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)  # one buffer read into again and again: no fresh 4 MiB object per read
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            if stop is not None and stop.is_set():
                raise HashingStopped(f"{path}: digest stopped")
            digest.update(view[:size])
    return digest.hexdigest()


_active: FileStamps | None = None  # set by stamps_active() for the length of a run
_written: dict[tuple[int, ...], str] = {}  # stat stamp -> sha256, of files this process wrote (note_written)


def note_written(path: Path, digest: str) -> None:
    """Record the sha256 of a file this process has just written whole, computed from the bytes as they were
    written (mergeq.core.shards: a run's merged and int4 checkpoints). A run's FileStamps trusts it while the
    file's stat stamp is unchanged, so the stage stamp does not read back what the stage just wrote. The record is
    keyed by the stamp, not the path: renaming the folder around the file (the atomic commit) keeps it valid;
    renaming or rewriting the file itself changes the stamp."""
    _written[tuple(_stat_stamp(path))] = digest


@contextlib.contextmanager
def stamps_active(stamps: FileStamps) -> Iterator[FileStamps]:
    """Every `file_digest` in the block (in any thread of this process) goes through `stamps`."""
    global _active
    previous, _active = _active, stamps
    try:
        yield stamps
    finally:
        _active = previous


def stamps_on() -> bool:
    """Whether a run's FileStamps cache is active (`stamps_active`)."""
    return _active is not None


def file_digest(path: Path, stop: threading.Event | None = None) -> str:
    """sha256 of the file at `path`, through the active FileStamps cache if a run opened one; `stop` as for
    sha256_file (a trusted stamp returns at once)."""
    stamps = _active
    return stamps.sha256(path, stop=stop) if stamps is not None else sha256_file(path, stop)


def tree_hashes(
    root: Path, *, recursive: bool = True, skip: Collection[str] = (), digest: Callable[[Path], str] | None = None
) -> dict[str, str]:
    """sha256 of every regular file under `root` (only those directly in it when not `recursive`: checkpoints
    and adapters are flat folders), keyed by POSIX path relative to it, in sorted order. Files below a
    directory named in `skip` are left out; a file `root` gives {its name: its digest}. `digest` hashes one
    file (default: file_digest)."""
    digest = digest or file_digest
    root = Path(root)
    if root.is_file():
        return {root.name: digest(root)}
    found = root.rglob("*") if recursive else root.iterdir()
    files = sorted(p for p in found if p.is_file() and not set(skip).intersection(p.relative_to(root).parts))
    return {p.relative_to(root).as_posix(): digest(p) for p in files}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stat_stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class FileStamps:
    """sha256 of files, trusted while a file's stat stamp (size, mtime, ctime, inode, device) is unchanged, as
    make and ccache trust timestamps. ctime cannot be set back by hand (`touch -d` changes it), and mergeq's
    writers rename new files into place (a new inode), so a rewritten file is always read again.

    `verify=True` reads every file (what `mergeq run --verify` asks for) and warns about any file whose content
    changed while its stamp did not. The stamps live in a JSON file; `save` keeps only the files looked up, or,
    with `keep` (a cache shared by many runs: `shared_stamps`), the `keep` most recently used of those recorded
    there by anyone and of this one's (each entry then also holds the time it was last used).

    `shared` (a run's cache): the shared cache, consulted for files outside `own` (the run's output directory)
    that this cache has no valid stamp for, and told every such file this one reads or trusts.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        verify: bool = False,
        keep: int | None = None,
        shared: FileStamps | None = None,
        own: Path | None = None,
    ):
        self.path, self.verify, self.keep = path, verify, keep
        self.shared = shared
        self._own = os.path.join(os.path.realpath(own), "") if own is not None else None
        self.known: dict[str, list] = {}
        self.used: dict[str, list] = {}
        self.read_files = self.read_bytes = self.trusted_files = self.trusted_bytes = 0
        self.written_files = self.written_bytes = 0  # digests taken as this process wrote the files
        if path is not None:
            try:
                known = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                known = {}
            if isinstance(known, dict):  # a damaged cache is an empty one
                self.known = {k: v for k, v in known.items() if isinstance(v, list) and len(v) >= 2}

    def sha256(self, path: Path, stop: threading.Event | None = None) -> str:
        key = os.path.realpath(path)
        before = _stat_stamp(path)
        seen = self.used.get(key)
        if seen is not None and seen[0] == before:  # read or trusted earlier in this run (one stage's output is
            return seen[1]  # the next one's input): --verify too reads each file once
        shared = self.shared if self.shared is not None and not key.startswith(self._own or "\0") else None
        entry = self.known.get(key)
        if shared is not None and (entry is None or entry[0] != before):
            entry = shared.known.get(key)  # an input another run or merge hashed
        if entry is not None and entry[0] == before and not self.verify:
            self.trusted_files += 1
            self.trusted_bytes += before[0]
            self._use(key, [before, entry[1]], shared)
            return entry[1]
        written = _written.get(tuple(before))
        if written is not None and not self.verify:  # hashed by this process as it wrote the file
            self.written_files += 1
            self.written_bytes += before[0]
            self._use(key, [before, written], shared)
            return written
        digest = sha256_file(path, stop)
        self.read_files += 1
        self.read_bytes += before[0]
        if entry is not None and entry[0] == before and entry[1] != digest:
            log.warning("%s changed without a change of size, time or inode: its stamp would have hidden it", path)
        if _stat_stamp(path) == before:  # not written to while it was read
            self._use(key, [before, digest], shared)
        return digest

    def _use(self, key: str, entry: list, shared: FileStamps | None) -> None:
        self.used[key] = entry
        if shared is not None:
            shared.used[key] = entry

    def save(self) -> None:
        if self.path is None:
            return
        from mergeq.core.atomic import write_json

        if self.keep is None:
            write_json(self.path, dict(sorted(self.used.items())))
            return
        kept = FileStamps(self.path).known  # as it is now: another process may have saved since this one read it
        now = time.time()
        kept.update({key: [entry[0], entry[1], now] for key, entry in self.used.items()})  # [stamp, digest, used]
        recent = sorted(kept.items(), key=lambda item: item[1][2] if len(item[1]) > 2 else 0.0)[-self.keep :]
        write_json(self.path, dict(recent))

    def save_shared(self) -> None:
        """Save the shared cache too. It is a convenience: failing to write it warns only."""
        if self.shared is not None:
            save_shared(self.shared)

    def summary(self) -> str:
        return (
            f"{self.trusted_files} files ({self.trusted_bytes / 2**30:.2f} GiB) trusted from their stamps, "
            f"{self.read_files} read ({self.read_bytes / 2**30:.2f} GiB), "
            f"{self.written_files} ({self.written_bytes / 2**30:.2f} GiB) hashed as this run wrote them"
        )


def shared_stamps(verify: bool = False) -> FileStamps:
    """The input digests every run and merge on this machine shares (`<cache>/stamps/inputs.json`)."""
    from mergeq.core.paths import cache_root

    return FileStamps(cache_root() / SHARED_STAMPS, verify=verify, keep=SHARED_STAMPS_KEPT)


def save_shared(stamps: FileStamps) -> None:
    """Save the shared input digests; a cache that cannot be written (a full disk, not a directory) warns only."""
    from mergeq.core.errors import MergeqError

    try:
        stamps.save()
    except (OSError, MergeqError) as err:  # MergeqError: a full disk, as mergeq.core.atomic reports it
        why = f"{stamps.path} ({err})"
        log.warning("could not save the input digests to %s; the next run or merge reads its inputs again", why)
    log.debug("input digests: %s", stamps.summary())
