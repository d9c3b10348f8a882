"""External tools that mergeq starts, written down while they run, so that none outlives a killed mergeq.

Every tool runs in its own process group and asks Linux to SIGKILL it when mergeq dies (PR_SET_PDEATHSIG,
exporters.llamacpp.run.die_with_parent). That covers `kill -9` of mergeq, except where the request cannot
take effect (a container without prctl, a tool that resets it, a tool started by a thread that has exited).
As a second line, each running tool has an entry in `<cache>/running/`: its process group, its start time
and its owner (the mergeq process). Before starting a tool, mergeq clears the entries of owners that are gone:
a tool still running for a dead owner is stopped (its whole group), with a warning that names it.

A process is identified by its pid AND its start time (field 22 of /proc/PID/stat), so a pid reused by an
unrelated process is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from pathlib import Path

from mergeq.core.paths import cache_root

log = logging.getLogger(__name__)


def registry_dir() -> Path:
    return cache_root() / "running"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after its closing one
    return int(stat.rpartition(")")[2].split()[19])


def _alive(pid: int, started: int | None) -> bool:
    return started is not None and start_time(pid) == started


def register(pid: int, name: str, argv: list[str] | tuple[str, ...]) -> Path | None:
    """Write down a tool that now runs as the leader of its own process group. Returns the entry to remove with
    `unregister` when the tool has ended (None when the entry could not be written: nothing depends on it)."""
    entry = registry_dir() / f"{pid}.json"
    record = {
        "pid": pid,
        "started": start_time(pid),
        "name": name,
        "argv": [str(a) for a in argv][:8],
        "owner": os.getpid(),
        "owner_started": start_time(os.getpid()),
    }
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = entry.with_name(entry.name + ".partial")
        partial.write_text(json.dumps(record))
        os.replace(partial, entry)
    except OSError as err:
        log.debug("cannot record tool %s (pid %d) in %s: %s", name, pid, entry.parent, err)
        return None
    return entry


def unregister(entry: Path | None) -> None:
    if entry is not None:
        with contextlib.suppress(OSError):
            entry.unlink()


def clear_stale() -> list[str]:
    """Stop every recorded tool whose mergeq is gone and forget it. Returns what was stopped, for messages."""
    folder = registry_dir()
    if not folder.is_dir():
        return []
    stopped = []
    for entry in sorted(folder.glob("*.json")):
        try:
            record = json.loads(entry.read_text())
            pid, owner = int(record["pid"]), int(record["owner"])
        except (OSError, ValueError, KeyError, TypeError):
            unregister(entry)  # unreadable: written by nothing that is still running it
            continue
        if _alive(owner, record.get("owner_started")):
            continue  # its mergeq is still running (this one or another): its tool is not stale
        if _alive(pid, record.get("started")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            what = f"{record.get('name', '?')} (pid {pid})"
            log.warning("stopped %s, left running by a mergeq process that is gone (pid %d)", what, owner)
            stopped.append(what)
        unregister(entry)
    return stopped
