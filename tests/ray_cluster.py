"""A Ray cluster of separate processes on this machine, for tests: a head and worker nodes, each a `ray start --block`
process with its own loopback address, so a test can lose one node (kill -9 of every process it runs) while the
head and the driver stay. Everything lives in a private temp dir and is stopped by pid, never by `ray stop`
(which would stop every Ray process of the machine)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE = 80_000_000  # bytes: stage outcomes are tiny, every artifact goes to the shared directory


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (Ray's workers start their own sessions: a process group misses them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


@dataclass
class LocalCluster:
    env: dict[str, str]
    temp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mqray", dir="/tmp")))
    port: int = field(default_factory=_free_port)
    nodes: list[subprocess.Popen] = field(default_factory=list)
    ips: int = 1

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_head(self, num_cpus: int = 0, memory: int = 1 << 30) -> subprocess.Popen:
        return self._start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.port}",
                f"--temp-dir={self.temp}",
                "--include-dashboard=false",
            ],
            num_cpus,
            memory,
            self.env,
        )

    def add_worker(
        self, num_cpus: int = 1, memory: int = 3 << 30, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        self.ips += 1
        ip = f"127.0.0.{self.ips}"
        proc = self._start(
            [f"--address={self.address}", f"--node-ip-address={ip}"], num_cpus, memory, {**self.env, **(env or {})}
        )
        self.wait_for(lambda: ip in self.alive_nodes(), f"worker node {ip} to join")
        return proc

    def _start(self, args: list[str], num_cpus: int, memory: int, env: dict[str, str]) -> subprocess.Popen:
        log = open(self.temp / f"node{len(self.nodes)}.log", "w")
        proc = subprocess.Popen(
            [
                RAY,
                "start",
                *args,
                f"--num-cpus={num_cpus}",
                f"--memory={memory}",
                f"--object-store-memory={OBJECT_STORE}",
                "--disable-usage-stats",
                "--block",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.nodes.append(proc)
        if "--head" in args:
            self.wait_for(lambda: bool(self.alive_nodes()), "the head node to start")
        return proc

    def alive_nodes(self) -> set[str]:
        """The addresses of the nodes the cluster counts alive (empty while the head is not up)."""
        probe = subprocess.run(
            [sys.executable, "-c", _ALIVE_NODES, self.address],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [line for line in probe.stdout.splitlines() if line.startswith("ALIVE ")]
        return set(lines[-1].split()[1:]) if probe.returncode == 0 and lines else set()

    def wait_for(self, condition, what: str, limit_s: float = 180) -> None:
        deadline = time.monotonic() + limit_s  # a safety net for a broken cluster, not a measurement
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; logs in {self.temp}")
            time.sleep(1)

    def lose(self, node: subprocess.Popen) -> None:
        """The node is lost: kill -9 of its raylet, agents and workers, all at once."""
        kill_tree(node)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            kill_tree(node)
        shutil.rmtree(self.temp, ignore_errors=True)


_ALIVE_NODES = """
import sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
print("ALIVE", *(node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]), flush=True)
"""
