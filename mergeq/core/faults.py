"""Fault injection for the hostile-input tests: inert unless `MERGEQ_FAULT` is set.

`MERGEQ_FAULT` holds comma-separated specs, each `ACTION@ARG`:

- `enospc@GLOB`     the disk "fills" while an atomic writer (mergeq.core.atomic) writes a final path whose name
                    matches GLOB: OSError(ENOSPC) is raised just before its rename, with everything written.
- `kill@N`          SIGKILL this process at the Nth commit point. Every atomic commit has two points:
                    just before its rename (odd) and just after it (even), counted across the process.
- `wait@N:PATH`     at commit point N, block until PATH exists (a run held open for a concurrency test).
- `trace@PATH`      append one line per commit point to PATH: number, time, before/after, final path.
- `crash@TOOL`      the llama.cpp tool TOOL (exporters.llamacpp.run.run_tool) writes half an output file and a
                    few stderr lines, then aborts (SIGABRT).
- `killtool@TOOL`   the same, but the tool dies by SIGKILL.
- `progress@PATH`   append one line per progress event to PATH: stage, number within the stage, event.
- `hold@STAGE:N:PATH` at the Nth progress event of pipeline stage STAGE, write that event's line to PATH and
                    block until killed (a kill test waits for PATH, then kills the process group: the kill lands
                    at a known unit of real work, however loaded the machine is).

Progress events mark real work about to start inside a stage: each item of a progress bar (mergeq.core.progress.track:
a tensor of the merge, a layer of the int4 quantizer, an evaluation window) and each llama.cpp tool run.
mergeq.pipeline names the stage (`enter_stage`); events are numbered from 1 within it.

Real runs never set the variable; each hook then costs one environment lookup.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
import sys
import time
from pathlib import Path

ENV = "MERGEQ_FAULT"

_points = 0  # commit points seen in this process
_stage = ""  # the pipeline stage now running ("" outside `mergeq run`)
_events = 0  # progress events seen in that stage
HOLD_LIMIT_S = 900  # a held process nobody killed (its test died) kills itself after this long

# The stand-in for a crashing tool: argv[1] is the mode, argv[2] the tool name, the rest its real arguments.
# It leaves a partial file where the tool would have written its output (any .gguf argument that does
# not exist yet), says a few things on stderr like a real tool, then dies.
_TOOL_STANDIN = r"""
import os, signal, sys
mode, name, args = sys.argv[1], sys.argv[2], sys.argv[3:]
for arg in args:
    if arg.endswith(".gguf") and not os.path.exists(arg):
        with open(arg, "wb") as handle:
            handle.write(b"GGUF" + b"\0" * 4096)
print(f"{name}: loading model", file=sys.stderr)
print(f"{name}: quantizing tensor blk.0.attn_q.weight", file=sys.stderr)
print(f"{name}: injected fault ({mode}): dying mid-quantization", file=sys.stderr, flush=True)
os.kill(os.getpid(), signal.SIGKILL if mode == "killtool" else signal.SIGABRT)
"""


def _specs() -> list[tuple[str, str]]:
    raw = os.environ.get(ENV, "")
    specs = []
    for part in raw.split(","):
        action, _, arg = part.strip().partition("@")
        if action:
            specs.append((action, arg))
    return specs


def commit_point(tmp: Path, final: Path, *, renamed: bool) -> None:
    """Called by mergeq.core.atomic just before (renamed=False) and just after (renamed=True) each rename."""
    specs = _specs()
    if not specs:
        return
    global _points
    _points += 1
    for action, arg in specs:
        if action == "enospc" and not renamed and fnmatch.fnmatch(Path(final).name, arg):
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV})", str(tmp))
        if action == "kill" and arg.isdigit() and int(arg) == _points:
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "trace":
            with open(arg, "a", encoding="utf-8") as handle:
                handle.write(f"{_points}\t{time.time():.3f}\t{'after' if renamed else 'before'}\t{final}\n")
        if action == "wait":
            number, _, path = arg.partition(":")
            if number.isdigit() and int(number) == _points:
                while not Path(path).exists():
                    time.sleep(0.05)


def enter_stage(name: str) -> None:
    """Called by mergeq.pipeline as a stage starts: progress events are numbered from 1 within each stage."""
    global _stage, _events
    _stage, _events = name, 0


def progress(event: str) -> None:
    """Called as a unit of real work starts (`event` names it, e.g. "gptq layers 2/4", "tool llama-quantize")."""
    specs = _specs()
    if not specs:
        return
    global _events
    _events += 1
    line = f"{_stage}\t{_events}\t{event}\n"
    for action, arg in specs:
        if action == "progress":
            with open(arg, "a", encoding="utf-8") as handle:
                handle.write(line)
        if action == "hold":
            stage, _, rest = arg.partition(":")
            number, _, path = rest.partition(":")
            if stage == _stage and number.isdigit() and int(number) == _events:
                _hold(Path(path), line)


def _hold(marker: Path, line: str) -> None:
    """Write `line` to `marker` in one rename (a waiting test never reads half of it), then wait to be killed."""
    partial = marker.with_name(marker.name + ".partial")
    partial.write_text(line, encoding="utf-8")
    os.replace(partial, marker)
    sys.stderr.flush()
    deadline = time.monotonic() + HOLD_LIMIT_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


def tool_argv(name: str, argv: tuple[str, ...], *, again: bool = False) -> tuple[str, ...]:
    """The argv to run for llama.cpp tool `name`: its own, or a stand-in that crashes like it. `again`: the same
    command run once more because its output was lost, the same unit of work, so no new progress event (the
    events of a stage are then the same in every run, whether or not a tool had to be asked twice)."""
    if not again:
        progress(f"tool {name}")
    for action, arg in _specs():
        if action in ("crash", "killtool") and arg == name:
            return (sys.executable, "-c", _TOOL_STANDIN, action, name, *map(str, argv[1:]))
    return argv
