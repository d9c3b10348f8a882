"""Running an external tool: captured output, a peak-memory reading, its own process group (stopped with
mergeq, also by kill -9), and a failure turned into ToolError naming the tool, saying what its exit status
or signal means and quoting its last output lines."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mergeq.core import children
from mergeq.core.errors import ToolError
from mergeq.core.memory import ChildPeak

STDERR_TAIL = 15  # lines of a failed tool's stderr quoted in the error


@dataclass(frozen=True)
class ToolCommand:
    """One external command: `name` is what errors call it (e.g. "llama-quantize")."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str | None] | None = None  # changes to os.environ: a value, or None to unset
    cwd: Path | None = None


@dataclass
class ToolResult:
    stdout: str
    stderr: str
    seconds: float
    peak_rss_bytes: int = 0
    peak_anon_bytes: int = 0  # of it, anonymous memory at its largest (sampled): the rest were mapped file pages


def run_tool(
    command: ToolCommand,
    *,
    on_line: Callable[[str], None] | None = None,
    hint: str | None = None,
    again: bool = False,
) -> ToolResult:
    """Run `command`, capturing stdout and stderr (each line also handed to `on_line`). `again`: the caller runs
    the same command once more because the last run's output was lost (mergeq.core.faults.tool_argv).

    A non-zero exit, a signal or a missing executable raises ToolError naming the tool, with its last
    stderr lines (stdout's when stderr is empty: llama.cpp logs to either). Ctrl-C stops the tool too.
    """
    env = None
    if command.env:
        env = dict(os.environ)
        for key, value in command.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
    children.clear_stale()  # a tool a killed mergeq left behind (where PR_SET_PDEATHSIG could not act)
    started = time.perf_counter()
    try:
        from mergeq.core import faults  # inert unless MERGEQ_FAULT names this tool (hostile-input tests)

        proc = subprocess.Popen(
            faults.tool_argv(command.name, command.argv, again=again),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=command.cwd,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    except FileNotFoundError as err:
        raise ToolError(f"{command.name}: cannot run {command.argv[0]}: not found", hint=hint) from err
    except PermissionError as err:
        raise ToolError(f"{command.name}: cannot run {command.argv[0]}: not executable", hint=hint) from err

    out_lines: list[str] = []
    err_lines: list[str] = []

    def pump(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            if on_line is not None:
                with contextlib.suppress(Exception):
                    on_line(line.rstrip("\n"))

    entry = children.register(proc.pid, command.name, command.argv)
    memory = ChildPeak(proc.pid)
    readers = [
        threading.Thread(target=pump, args=(proc.stdout, out_lines), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, err_lines), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # like proc.wait(), plus rusage as a fallback for the peak
        code = proc.returncode = os.waitstatus_to_exitcode(status)
        peak = memory.finish(usage.ru_maxrss)
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        for reader in readers:
            reader.join()
        children.unregister(entry)
    result = ToolResult("".join(out_lines), "".join(err_lines), time.perf_counter() - started, peak, memory.peak_anon)
    if code != 0:
        raise tool_failure(command.name, code, result, hint=hint)
    return result


# How the evaluation's llama.cpp tools load a GGUF: weights used in place from the memory-mapped file, never
# repacked into an anonymous copy (llama.cpp's CPU default wherever memory allows). Three reasons, measured:
# - the scores of a GGUF no longer depend on the memory limit (repacked kernels sum in another order: KL
#   0.619069 repacked against 0.618915 mapped on the Llama-3.1-8B-shaped run);
# - the tool holds its buffers, not a second copy of the model: its pages of the file are page cache, which the
#   kernel drops and reads again under pressure (the 8B Q4_K_M evaluation finished in a cgroup of 3.94 GiB;
#   repacked, it held 5.32 GiB of its own);
# - on this CPU (AVX-512, llama.cpp's llamafile kernels) it is faster: 1.33 s against 1.78 s per 512-token pass of
#   a 2-layer model of Llama-3.1-8B widths in Q4_K_M, 5.8 s against 7.5 s for four windows with loading.
# Part of the gguf stage's key (mergeq.stagework): the scores change with it.
EVAL_WEIGHT_FLAGS = ("--no-repack",)
EVAL_WEIGHTS = "mapped from the file, not repacked (--no-repack)"


def weight_flags(model: Path, buffers: int = 0) -> tuple[tuple[str, ...], str | None]:
    """Extra flags for a llama.cpp tool that loads `model`, and why (None: no flags). llama-server's; the
    evaluation's tools always map the weights (EVAL_WEIGHT_FLAGS above).

    llama.cpp's CPU backend repacks quantized weights into anonymous memory for its own kernels: a copy of
    the model that the kernel cannot page out. Under a memory limit (this process's cgroup: a container, a
    `systemd-run -p MemoryMax=`) too small for that copy beside what else is held there, `--no-repack` keeps
    the weights in the memory-mapped file, which the kernel pages in and out as needed; the tool would
    otherwise be OOM-killed. What else is held: mergeq's own resident set now, the tool's runtime
    (LLAMACPP_RUNTIME_BYTES) and `buffers`, what the caller knows the tool will allocate."""
    from mergeq.core.memory import LLAMACPP_RUNTIME_BYTES, memory_limit_bytes, resident_bytes

    limit = memory_limit_bytes()
    if limit is None:
        return (), None
    size = Path(model).stat().st_size
    beside = (resident_bytes() or 0) + LLAMACPP_RUNTIME_BYTES + buffers
    if size + beside <= limit:
        return (), None
    return ("--no-repack",), (
        f"weights not repacked (--no-repack): {Path(model).name} ({size / 2**30:.2f} GiB) and "
        f"{beside / 2**30:.2f} GiB beside it (mergeq's resident set, the tool's buffers) do not fit this "
        f"process's memory limit ({limit / 2**30:.2f} GiB)"
    )


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the mergeq thread that started it dies, so a
    `kill -9` of mergeq leaves no llama.cpp tool running (the tool has its own process group, so the
    terminal's Ctrl-C reaches it only through mergeq, which then stops the group)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(137)


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session), SIGKILL if it lingers
    `grace` seconds; reaped either way."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.kill()
    proc.wait()


# What a tool's death by each signal means, as far as the signal alone tells (never the input's fault
# unless the tool said so): (what happened, what to do or None to keep the caller's hint).
REBUILD_HINT = (
    "rebuild it: mergeq setup-llamacpp --rebuild (the build tests itself and falls back to a portable "
    "instruction set), or force that variant: mergeq setup-llamacpp --rebuild --variant portable"
)
SIGNAL_MEANINGS: dict[int, tuple[str, str | None]] = {
    signal.SIGILL: (
        "the CPU rejected an instruction of this llama.cpp build (an illegal instruction): the "
        "build does not match this processor; the input file is not the cause",
        REBUILD_HINT,
    ),
    signal.SIGKILL: (
        "SIGKILL comes from outside the tool: another process, or the kernel (its out-of-memory "
        "killer logs to dmesg when it is the one)",
        None,
    ),
    signal.SIGSEGV: ("the tool made an invalid memory access", None),
    signal.SIGBUS: ("a memory-mapped file could not be read: it was truncated while in use, or the disk failed", None),
    signal.SIGABRT: ("the tool aborted itself on a failed check; its last lines say which", None),
    signal.SIGTERM: ("the tool was asked to stop, from outside", None),
    signal.SIGINT: ("the tool was interrupted", None),
}


def describe_exit(code: int) -> tuple[str, str | None]:
    """A tool's exit status in words, and the hint its cause calls for (None: no known one)."""
    if code >= 0:
        return f"failed with exit code {code}", None
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    meaning, hint = SIGNAL_MEANINGS.get(-code, (None, None))
    how = f"was killed by signal {-code} ({name})"
    return (f"{how}: {meaning}" if meaning else how), hint


def quoted_tail(result: ToolResult, lines: int = STDERR_TAIL) -> str:
    """A tool's last non-blank output lines (stderr's, or stdout's when stderr is empty: llama.cpp logs to
    either), indented and marked for an error message."""
    source = result.stderr if result.stderr.strip() else result.stdout
    tail = [line for line in source.splitlines() if line.strip()][-lines:]
    return "\n".join(f"    | {line}" for line in tail) or "    | (no output)"


def tool_failure(name: str, code: int, result: ToolResult, *, hint: str | None = None) -> ToolError:
    how, known_hint = describe_exit(code)
    error = ToolError(f"{name} {how}; its last output lines:\n{quoted_tail(result)}", hint=known_hint or hint)
    error.returncode = code
    return error
