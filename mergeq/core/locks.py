"""One exclusive lock across processes: a `flock` on a lock file that holds the holder's pid; the others wait,
then go on, or (where waiting makes no sense, as for two runs writing one output directory) refuse clearly."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(
    lock_file: Path, waiting: str = "", *, refuse: Callable[[str], BaseException] | None = None
) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if missing), with this process's pid written in it.

    If another process holds it: wait for it, logging `waiting`; or, given `refuse`, do not wait and raise
    `refuse(holder)`, where holder is the pid the holder wrote ("unknown" if none).
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if refuse is not None:
                handle.seek(0)
                raise refuse(handle.read().strip() or "unknown") from None
            log.info("%s", waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
