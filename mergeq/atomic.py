"""Atomic writes: everything goes to a temporary sibling first, then one rename puts it in place.

A killed process leaves only `.<name>.tmp-*` siblings behind, never something that looks finished,
and the next attempt removes those leftovers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}{TMP_MARK}"


def remove_stale_tmp(final: Path) -> None:
    """Delete leftovers of earlier killed attempts at writing `final`."""
    parent = final.parent
    if not parent.is_dir():
        return
    for leftover in parent.glob(_tmp_prefix(final) + "*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `final` in one rename.

    On any exception the temporary directory is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(final)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} appeared while it was being written")
            old = final.with_name(_tmp_prefix(final) + "old")
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "wb") -> Iterator:
    """Yield an open temporary file; on success it is fsynced and renamed onto `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(final), dir=final.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(final: Path, data) -> None:
    """Atomically write `data` as stable, sorted, indented JSON (byte-identical for equal data)."""
    with atomic_file(final, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def write_text(final: Path, text: str) -> None:
    with atomic_file(final, "w") as handle:
        handle.write(text)
