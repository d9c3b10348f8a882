"""Atomic writes: everything goes to a temporary sibling first, then one rename puts it in place.

A killed process leaves only `.<name>.tmp-*` siblings behind, never something that looks finished,
and the next attempt removes those leftovers.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mergeq.core import faults
from mergeq.core.errors import MergeqError
from mergeq.core.paths import free_bytes, nearest_existing

TMP_MARK = ".tmp-"


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}{TMP_MARK}"


def remove_stale_tmp(final: Path) -> None:
    """Delete leftovers of earlier killed attempts at writing `final`."""
    parent = final.parent
    if not parent.is_dir():
        return
    # also leftovers of writers nested inside an earlier attempt's temporary directory (`..NAME.tmp-X.tmp-Y`:
    # the merge inside the pipeline's merge stage), which a kill leaves beside it
    stale = [p for p in parent.glob(".*") if p.name.lstrip(".").startswith(f"{final.name}{TMP_MARK}")]
    for leftover in stale:
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
        faults.commit_point(tmp, final, renamed=False)
        old = None
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} appeared while it was being written")
            old = final.with_name(_tmp_prefix(final) + "old")
            os.replace(final, old)
        os.replace(tmp, final)
        faults.commit_point(tmp, final, renamed=True)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    except BaseException as err:
        full = disk_full(final, _disk_full_size(err, tmp))
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from err
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
        faults.commit_point(tmp, final, renamed=False)
        os.replace(tmp, final)
        faults.commit_point(tmp, final, renamed=True)
        fsync_dir(final.parent)
    except BaseException as err:
        full = disk_full(final, _disk_full_size(err, tmp))
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from err
        raise


def _disk_full_size(err: BaseException, tmp: Path) -> int | None:
    """For a full disk (ENOSPC, EDQUOT): the bytes written to `tmp` before it failed; else None."""
    if not isinstance(err, OSError) or err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    if tmp.is_file():
        return tmp.stat().st_size
    return sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file() and not p.is_symlink())


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def disk_full(final: Path, needed: int | None) -> MergeqError | None:
    """The error for a write that ran out of space (None when `needed` is None): where, how much it needed
    (what it had written when the disk filled), how much was free then."""
    if needed is None:
        return None
    probe = nearest_existing(Path(final).absolute().parent)
    free = free_bytes(probe)
    return MergeqError(
        f"no space left on the device while writing {final}: it needs at least {_human(needed)} "
        f"({needed} bytes were written when the disk filled, {_human(free)} left at {probe}); "
        f"nothing was replaced and the partial files were removed",
        hint=f"free at least {_human(needed)} at {probe} (or write elsewhere) and run again",
    )


def write_json(final: Path, data) -> None:
    """Atomically write `data` as stable, sorted, indented JSON (byte-identical for equal data)."""
    with atomic_file(final, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def write_text(final: Path, text: str) -> None:
    with atomic_file(final, "w") as handle:
        handle.write(text)
