"""Measuring resident memory honestly: per stage, and per child process.

ru_maxrss is no good for per-stage or per-child peaks on Linux: it never goes down, and a process started
by a large one (through vfork or fork, then exec) inherits its parent's high-water mark. A test's child
launched from pytest reported 747 MB where it never held more than 486 MB. So mergeq reads VmHWM (the
high-water mark of the process's own memory map), resets it at the start of a stage, and samples it for
child processes while they run.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc

SAMPLE_SECONDS = 0.02
# fp32 logits held at once while the stream projects on the output embedding (mergeq.core.streaming); here, not
# there, so that mergeq.budget predicts with it without importing torch when a run is planned
LOGITS_BUDGET_BYTES = 256 << 20
# a llama.cpp tool's own compute buffers and KV cache at mergeq's contexts (<= 2048 tokens), beside its weights
LLAMACPP_RUNTIME_BYTES = 256 << 20
# fp32 logits llama-perplexity holds for one batch (windows x n_ctx x n_vocab): mergeq's evaluation sizes its
# batches to stay within it (exporters.eval_gguf.parallel_windows), and mergeq.budget predicts with it
LLAMA_LOGITS_BUDGET_BYTES = 512 << 20


def _status_bytes(pid: int | str, *fields: str) -> list[int | None]:
    """The named fields of /proc/PID/status (kB values) in bytes; None for each where /proc cannot tell."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key = line.split(":", 1)[0]
                if key in fields:
                    found[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return [None] * len(fields)
    return [found.get(field) for field in fields]


def _vm_hwm_bytes(pid: int | str = "self") -> int | None:
    return _status_bytes(pid, "VmHWM")[0]


def resident_bytes() -> int | None:
    """This process's resident set now (VmRSS), or None where /proc cannot tell."""
    return _status_bytes("self", "VmRSS")[0]


def peak_rss_bytes() -> int:
    """This process's resident high-water mark since it started or since the last `reset_peak_rss`."""
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class ChildPeak:
    """The peak RSS of a running child process, sampled from its VmHWM until it exits; and the peak of its
    anonymous memory (RssAnon, sampled every SAMPLE_SECONDS): what the child allocated, as opposed to pages of
    files it maps (a llama.cpp tool's model file), which the kernel can drop and read again under pressure.

    Falls back to the rusage that wait4 returns (which may include the parent's mark) where /proc is missing.
    """

    def __init__(self, pid: int):
        import threading

        self.pid = pid
        self.peak = 0
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            hwm, anon = _status_bytes(self.pid, "VmHWM", "RssAnon")
            if hwm is None:
                return
            self.peak = max(self.peak, hwm)
            self.peak_anon = max(self.peak_anon, anon or 0)
            self._stop.wait(SAMPLE_SECONDS)

    def finish(self, rusage_maxrss_kib: int) -> int:
        """Stop sampling (call right after the child was reaped); the peak in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak or rusage_maxrss_kib * 1024


@contextlib.contextmanager
def collector_paused():
    """No cyclic garbage collection in the block; then every object alive is frozen out of the collector's reach
    (gc.freeze) and collection goes on. For imports of large libraries: torch, transformers and PEFT make 450k
    objects, and each full collection walks all of them (7 during one merge's imports, 0.6 CPU s); frozen, they
    are not walked again. Frozen objects are still freed by reference counting: only cycles among them stay."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand heap memory freed so far back to the system (glibc's malloc_trim; a no-op elsewhere).

    Called between decoder layers by the streaming passes: glibc keeps freed heap pages, and the resident set
    then grew layer after layer (measured: GPTQ of 45 MB fp32 layers, +70 MB RSS per layer without it,
    +6 MB per layer, the buffered output, with it)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def memory_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup (v1 `memory.limit_in_bytes`, v2 `memory.max`), or None when
    there is none (or it cannot be read): the memory this process and its children may use together."""
    from pathlib import Path

    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # cgroup v1
            limit_file = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        elif controllers == "":  # cgroup v2's unified hierarchy
            limit_file = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        else:
            continue
        try:
            value = limit_file.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:  # v1 says "no limit" with a huge number, v2 with "max"
            return int(value)
    return None
