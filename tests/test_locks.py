"""mergeq.core.locks.exclusive, the one cross-process lock: it waits for a holder, or refuses naming the holder's
pid (the run lock on an output directory), and the lock file then names the new holder."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mergeq.core.errors import MergeqError
from mergeq.core.locks import exclusive
from mergeq.stages import STATE_DIR, run_lock

REPO = Path(__file__).resolve().parent.parent

HOLDER = """
import sys
from mergeq.core.locks import exclusive
with exclusive(sys.argv[1], "waiting"):
    print("held", flush=True)
    sys.stdin.read()  # holds the lock until the test closes stdin
"""


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock on a file, until the test lets it go."""
    procs = []

    def start(lock: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_a_second_run_on_one_output_directory_refuses_naming_the_first(tmp_path, holder):
    first = holder(tmp_path / STATE_DIR / "lock")
    with pytest.raises(MergeqError, match=rf"another mergeq run \(pid {first.pid}\) is writing to {tmp_path}"):
        with run_lock(tmp_path):
            pass
    first.stdin.close()
    first.wait(timeout=60)
    with run_lock(tmp_path):
        assert (tmp_path / STATE_DIR / "lock").read_text() == str(os.getpid())


def test_a_waiting_lock_goes_on_once_the_holder_lets_go(tmp_path, holder, caplog):
    lock = tmp_path / "setup.lock"
    first = holder(lock)
    entered = threading.Event()

    def second():
        with exclusive(lock, "another process holds it; waiting"):
            entered.set()

    thread = threading.Thread(target=second)
    with caplog.at_level("INFO", logger="mergeq.core.locks"):
        thread.start()
        while "waiting" not in caplog.text:  # the second one has found the lock held
            assert thread.is_alive()
            threading.Event().wait(0.01)
        assert not entered.is_set()
        first.stdin.close()
        first.wait(timeout=60)
        thread.join(timeout=60)
    assert entered.is_set()
