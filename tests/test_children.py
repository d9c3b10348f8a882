"""No tool outlives a killed mergeq: tools are written down while they run (mergeq.core.children), and the next
tool start stops any tool whose mergeq is gone, even where Linux's parent-death signal did not act."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporters.llamacpp.run import ToolCommand, run_tool
from mergeq.core import children

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"], start_new_session=True)


def _record(tool: subprocess.Popen, owner: int, owner_started, name: str = "llama-quantize") -> Path:
    folder = children.registry_dir()
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / f"{tool.pid}.json"
    entry.write_text(
        json.dumps(
            {
                "pid": tool.pid,
                "started": children.start_time(tool.pid),
                "name": name,
                "argv": ["x"],
                "owner": owner,
                "owner_started": owner_started,
            }
        )
    )
    return entry


def test_a_tool_whose_mergeq_is_gone_is_stopped(cache):
    tool = _sleeper()
    try:
        entry = _record(tool, _dead_pid(), 12345)
        assert children.clear_stale() == [f"llama-quantize (pid {tool.pid})"]
        assert tool.wait(timeout=10) == -signal.SIGKILL
        assert not entry.exists()
    finally:
        tool.kill()


def test_a_running_mergeq_keeps_its_tool_and_a_reused_pid_is_left_alone(cache):
    mine, other = _sleeper(), _sleeper()
    try:
        _record(mine, os.getpid(), children.start_time(os.getpid()))  # its owner (this process) runs
        entry = _record(other, _dead_pid(), 1)
        record = json.loads(entry.read_text())
        entry.write_text(json.dumps({**record, "started": record["started"] - 1}))  # the pid now names another
        assert children.clear_stale() == []
        assert mine.poll() is None and other.poll() is None
        assert not entry.exists(), "the entry of a dead owner is forgotten"
        assert (children.registry_dir() / f"{mine.pid}.json").exists()
    finally:
        mine.kill()
        other.kill()


def _state(pid: int) -> str:
    """The process's state letter (Z: killed, waiting to be reaped by init), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


CHILD = r"""
import sys
from exporters.llamacpp import run
run.die_with_parent = lambda: None  # as where PR_SET_PDEATHSIG cannot act
run.run_tool(run.ToolCommand("llama-standin", ("sleep", "300")))
"""


def test_kill_9_of_mergeq_then_the_next_tool_start_clears_the_orphan(cache):
    """A mergeq process runs a tool and is killed by SIGKILL; the tool survives it (no parent-death signal
    here); the next tool that mergeq starts stops the orphan first."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MERGEQ_CACHE": str(cache)}
    owner = subprocess.Popen([sys.executable, "-c", CHILD], env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    entries: list[Path] = []
    while not entries:
        assert owner.poll() is None, "the stand-in mergeq ended before starting its tool"
        assert time.monotonic() < deadline, "the stand-in mergeq never recorded its tool"
        entries = list(children.registry_dir().glob("*.json")) if children.registry_dir().is_dir() else []
        time.sleep(0.05)
    orphan = json.loads(entries[0].read_text())["pid"]
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    try:
        assert children.start_time(orphan) is not None, "the tool died with its mergeq: nothing to clear"
        run_tool(ToolCommand("true", ("true",)))
        deadline = time.monotonic() + 10
        while _state(orphan) not in ("gone", "Z") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _state(orphan) in ("gone", "Z"), f"the orphan (pid {orphan}) still runs: {_state(orphan)}"
        assert list(children.registry_dir().glob("*.json")) == []
    finally:
        try:
            os.killpg(orphan, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_memory_limit_is_read_from_the_cgroup_and_turns_off_repacking(tmp_path, monkeypatch):
    """Inside a memory cgroup, mergeq reads its limit; a GGUF that does not fit beside mergeq under it is loaded
    by llama.cpp without repacking (weights stay in the page cache, which the kernel can reclaim)."""
    from memory_limit import run_limited, unavailable

    from exporters.llamacpp.run import weight_flags
    from mergeq.core import memory

    if (why := unavailable()) is not None:
        pytest.skip(why)
    limit = 700 << 20
    run = run_limited(
        [sys.executable, "-c", "from mergeq.core.memory import memory_limit_bytes as m; print(m())"],
        limit,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.strip()) == limit

    gguf = tmp_path / "model.gguf"
    with open(gguf, "wb") as handle:
        handle.truncate(300 << 20)  # sparse: the size is what counts
    monkeypatch.setattr(memory, "memory_limit_bytes", lambda: None)
    assert weight_flags(gguf) == ((), None)
    monkeypatch.setattr(memory, "resident_bytes", lambda: 100 << 20)
    fits = (300 << 20) + (100 << 20) + memory.LLAMACPP_RUNTIME_BYTES + (50 << 20)
    monkeypatch.setattr(memory, "memory_limit_bytes", lambda: fits)
    assert weight_flags(gguf, buffers=50 << 20) == ((), None)
    flags, why = weight_flags(gguf, buffers=(50 << 20) + 1)  # one byte more beside it: no room for the copy
    assert flags == ("--no-repack",)
    monkeypatch.setattr(memory, "resident_bytes", lambda: (100 << 20) + 1)  # mergeq holding one byte more
    assert weight_flags(gguf, buffers=50 << 20)[0] == ("--no-repack",)
    monkeypatch.setattr(memory, "memory_limit_bytes", lambda: 600 << 20)
    flags, why = weight_flags(gguf)
    assert flags == ("--no-repack",) and "model.gguf (0.29 GiB)" in why and "0.35 GiB beside" in why
    assert "limit (0.59 GiB)" in why
