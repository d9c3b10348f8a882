"""Run a command under a hard memory limit: a cgroup-v1 memory group, or `systemd-run -p MemoryMax=` where that
is what the machine has. Over the limit the kernel OOM-kills the command.

Shared by tests/test_memory_limit.py and the benchmark scripts."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
_counter = itertools.count()


@dataclass
class LimitedRun:
    returncode: int
    seconds: float
    max_usage_bytes: int | None  # the group's high-water mark (anonymous memory and page cache charged to it)
    oom_killed: bool
    stdout: str
    stderr: str


def _v1_writable() -> str | None:
    """None when a cgroup-v1 memory group can be made here, else why not."""
    if not (CGROUP_V1 / "memory.limit_in_bytes").is_file():
        return f"no cgroup-v1 memory controller at {CGROUP_V1}"
    probe = CGROUP_V1 / f"mergeq-probe-{os.getpid()}-{next(_counter)}"
    try:
        probe.mkdir()
        (probe / "memory.limit_in_bytes").write_text(str(1 << 30))
    except OSError as err:
        return f"cannot create a memory cgroup under {CGROUP_V1}: {err.strerror}"
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass
    return None


def unavailable() -> str | None:
    """Why no hard memory limit can be set on this machine, or None when one can."""
    v1 = _v1_writable()
    if v1 is None:
        return None
    if (
        shutil.which("systemd-run")
        and subprocess.run(
            ["systemd-run", "--user", "--scope", "-q", "-p", "MemoryMax=1G", "true"], capture_output=True
        ).returncode
        == 0
    ):
        return None
    return f"{v1}; and systemd-run --scope -p MemoryMax= is not usable"


def run_limited(
    argv: list[str], limit_bytes: int, *, env: dict | None = None, cwd: Path | None = None, timeout: float = 600
) -> LimitedRun:
    """Run argv with at most limit_bytes of memory (RAM + swap)."""
    if _v1_writable() is None:
        return _run_v1(argv, limit_bytes, env, cwd, timeout)
    return _run_systemd(argv, limit_bytes, env, cwd, timeout)


def _run_v1(argv, limit_bytes, env, cwd, timeout) -> LimitedRun:
    group = CGROUP_V1 / f"mergeq-test-{os.getpid()}-{next(_counter)}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        memsw = group / "memory.memsw.limit_in_bytes"
        if memsw.is_file():
            memsw.write_text(str(limit_bytes))  # no escape into swap

        def enter():  # in the child, before exec: everything it runs is inside the group
            with open(group / "cgroup.procs", "w") as handle:
                handle.write(str(os.getpid()))

        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, preexec_fn=enter)
        seconds = time.perf_counter() - start
        usage = int((group / "memory.max_usage_in_bytes").read_text())
        oom = _oom_kills(group) > 0 or proc.returncode in (-9, 137)
        return LimitedRun(proc.returncode, seconds, usage, oom, proc.stdout, proc.stderr)
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def _run_systemd(argv, limit_bytes, env, cwd, timeout) -> LimitedRun:
    start = time.perf_counter()
    proc = subprocess.run(
        ["systemd-run", "--user", "--scope", "-q", "-p", f"MemoryMax={limit_bytes}", "-p", "MemorySwapMax=0", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return LimitedRun(
        proc.returncode, time.perf_counter() - start, None, proc.returncode in (-9, 137), proc.stdout, proc.stderr
    )
