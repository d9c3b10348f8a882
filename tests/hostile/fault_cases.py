"""The fault set of issue 7, run through the CLI on the corpus's tiny models (tests/hostile/make_corpus.py).

- a full disk (ENOSPC, injected by MERGEQ_FAULT=enospc@NAME at the commit of an atomic writer) during a merge and
  during GGUF and AWQ exports over a previous artifact: clear error with the space needed, the previous artifact
  byte-identical, no temporary file left;
- a llama.cpp tool (converter, llama-quantize) that crashes or is SIGKILLed mid-quantization;
- two `mergeq run` on one output directory: the second refuses while the first runs, the first's outputs are
  those of a run alone;
- `kill -9` of `mergeq run` inside each stage (merge, gguf, awq, gptq), at seeded random units of real work
  (a tensor, a layer, an evaluation window, a llama.cpp tool: the run is held there by MERGEQ_FAULT=hold@ and
  its whole process group killed, so the kill lands inside the stage however loaded the machine is) and at
  seeded random commit points, each followed by a rerun that must skip the finished stages, redo the killed
  one and finish with artifacts byte-identical to an uninterrupted run's. Never timed: a kill after a fraction
  of a measured stage time lands after the stage on a busy machine.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from harness import (
    REPO,
    Outcome,
    check_fragments,
    compare,
    mergeq_command,
    model_files,
    run_inprocess,
    snapshot,
    subprocess_env,
    temp_leftovers,
)

STAGES = ("merge", "gguf", "awq", "gptq")
STAGE_DIRS = {"merge": "merged", "gguf": "gguf", "awq": "awq", "gptq": "gptq"}
KILL_SEED = 20261123
KILLS_PER_STAGE = 3  # 12 kills in all: per stage 2 held at units of work, 1 at a commit point
RUN_TIMEOUT = 600


def _shared(root: Path) -> Path:
    return Path(root) / "shared"


def _fresh(root: Path, name: str) -> Path:
    folder = Path(root) / "faults" / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _judge(
    name: str,
    what: str,
    folder: Path,
    argv: list[str],
    expect: list[str],
    env: dict[str, str],
    code_wanted: int | None = None,
) -> Outcome:
    before = snapshot(folder)
    code, output = run_inprocess(argv, env)
    new, lost = compare(before, snapshot(folder))
    outcome = Outcome(name, "fault", what, code, output, check_fragments(output, expect), new, lost)
    if code_wanted is not None and code != code_wanted:
        outcome.problems.append(f"exit code {code}, expected {code_wanted}")
    return outcome


# ------------------------------------------------------------------------------------------ full disk


def enospc_merge(root: Path) -> Outcome:
    s = _shared(root)
    folder = _fresh(root, "enospc-merge")
    prev = folder / "merged"
    argv = ["merge", "--base", str(s / "base"), "--adapter", str(s / "adapter"), "--out", str(prev), "--no-validate"]
    code, output = run_inprocess(argv)
    assert code == 0, output
    return _judge(
        "enospc-merge",
        "disk full while writing the merged checkpoint over a previous one",
        folder,
        [*argv[:4], f"{s / 'adapter'}@0.5", *argv[5:], "--overwrite"],
        ["no space left", str(prev), "needs at least"],
        {"MERGEQ_FAULT": f"enospc@{prev.name}"},
        2,
    )


def enospc_gguf(root: Path) -> Outcome:
    s = _shared(root)
    folder = _fresh(root, "enospc-gguf")
    out = folder / "gguf"
    argv = ["export", "gguf", "--model", str(s / "merged"), "--out", str(out), "--quant", "Q8_0", "--no-eval"]
    code, output = run_inprocess(argv)
    assert code == 0, output
    return _judge(
        "enospc-gguf",
        "disk full while llama-quantize's output is committed over a previous GGUF",
        folder,
        argv,
        ["no space left", str(out / "Q8_0"), "needs at least"],
        {"MERGEQ_FAULT": "enospc@Q8_0"},
        2,
    )


def enospc_awq(root: Path) -> Outcome:
    s = _shared(root)
    folder = _fresh(root, "enospc-awq")
    out = folder / "awq"
    argv = [
        "export",
        "awq",
        "--model",
        str(s / "merged"),
        "--out",
        str(out),
        "--no-eval",
        "--calib",
        str(s / "calib.txt"),
        "--group-size",
        "32",
        "--samples",
        "4",
        "--seq-len",
        "32",
    ]
    code, output = run_inprocess(argv)
    assert code == 0, output
    return _judge(
        "enospc-awq",
        "disk full while writing an AWQ checkpoint over a previous one",
        folder,
        argv,
        ["no space left", str(out), "needs at least"],
        {"MERGEQ_FAULT": f"enospc@{out.name}"},
        2,
    )


_REAL_DISK_SCRIPT = r"""
set -u
mount -t tmpfs -o size=$SIZE tmpfs "$DISK" || exit 97
"$@" --out "$DISK/merged" > "$LOGS/first.log" 2>&1 || exit 98
(cd "$DISK" && find . -type f -exec sha256sum {} + | sort) > "$LOGS/before.txt"
"$@" --out "$DISK/merged" --overwrite > "$LOGS/second.log" 2>&1
echo $? > "$LOGS/second.code"
(cd "$DISK" && find . -type f -exec sha256sum {} + | sort) > "$LOGS/after.txt"
(cd "$DISK" && find . -mindepth 1 | sort) > "$LOGS/tree.txt"
"""


def real_disk_available() -> bool:
    """Whether this machine lets an unprivileged test mount a size-limited tmpfs in its own namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


def enospc_real_disk(root: Path) -> Outcome:
    """A real full disk: a 900 KiB tmpfs (in a private mount namespace) holds one merged checkpoint (~520 KiB)
    but not a second beside it, so the overwrite fails mid-write with a real ENOSPC."""
    s = _shared(root)
    folder = _fresh(root, "enospc-real-disk")
    disk, logs = folder / "disk", folder / "logs"
    disk.mkdir()
    logs.mkdir()
    argv = mergeq_command("merge", "--base", str(s / "base"), "--adapter", str(s / "adapter"), "--no-validate")
    env = subprocess_env(SIZE="900k", DISK=str(disk), LOGS=str(logs))
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", _REAL_DISK_SCRIPT, "sh", *argv],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    read = lambda name: (logs / name).read_text() if (logs / name).exists() else ""  # noqa: E731
    outcome = Outcome(
        "enospc-real-disk",
        "fault",
        "a real full disk (small tmpfs) while overwriting a merge",
        int(read("second.code") or -1),
        read("second.log"),
        check_fragments(read("second.log"), ["no space left", "merged", "needs at least"]),
    )
    if proc.returncode != 0:
        outcome.problems.append(f"setup failed (exit {proc.returncode}): {proc.stderr[-1000:]} {read('first.log')}")
        return outcome
    if read("before.txt") != read("after.txt"):
        outcome.lost.append(f"{disk}/merged changed: the previous merge was not kept intact")
    tree = [line for line in read("tree.txt").split() if ".tmp-" in line]
    outcome.leftovers.extend(tree)
    return outcome


# ------------------------------------------------------------------------------------------ llama.cpp tools


def tool_fault(root: Path, mode: str, tool: str) -> Outcome:
    s = _shared(root)
    name = f"{mode}-{tool.replace('.py', '').replace('_', '-')}"
    folder = _fresh(root, name)
    out = folder / "gguf"
    argv = ["export", "gguf", "--model", str(s / "merged"), "--out", str(out), "--quant", "Q8_0", "--no-eval"]
    signal_text = "killed by signal 9" if mode == "killtool" else "killed by signal 6"
    outcome = _judge(
        name,
        f"{tool} {'killed (SIGKILL)' if mode == 'killtool' else 'crashes (SIGABRT)'} mid-run",
        folder,
        argv,
        [tool, signal_text, "injected fault"],
        {"MERGEQ_FAULT": f"{mode}@{tool}"},
        3,
    )
    gguf_files = [p for p in outcome.leftovers if p.endswith(".gguf")]
    if gguf_files:
        outcome.problems.append(f"finished-looking GGUF files left: {gguf_files}")
    return outcome


# ------------------------------------------------------------------------------------------ pipeline runs


def start_run(
    config: Path,
    out: Path,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    quiet: bool = True,
    group: bool = False,
) -> subprocess.Popen:
    """`mergeq run CONFIG --out OUT` in the background; with `group`, in a process group of its own (its pid)."""
    argv = mergeq_command(*(["-q"] if quiet else []), "run", str(config), "--out", str(out))
    with open(log, "w") if log else contextlib.nullcontext(subprocess.DEVNULL) as sink:  # the child keeps a copy
        return subprocess.Popen(
            argv,
            env=subprocess_env(**(env or {})),
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=group,
        )


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 of the process group `proc` leads (start_run(..., group=True)), children included."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def finish(proc: subprocess.Popen, log: Path | None) -> tuple[int, str]:
    code = proc.wait(timeout=RUN_TIMEOUT)
    return code, log.read_text() if log and log.exists() else ""


@dataclass
class Reference:
    out: Path
    files: dict[str, str]
    seconds: dict[str, float]  # stage -> duration of that stage in the uninterrupted run
    points: dict[str, list[int]]  # stage -> commit points (numbered as in a run that starts at that stage)
    events: dict[str, list[str]]  # stage -> its progress events in order (event N is events[stage][N - 1])


def reference_run(root: Path) -> Reference:
    """One uninterrupted `mergeq run` of the shared config, traced: its artifacts are what every resumed run
    must reproduce byte for byte."""
    folder = Path(root) / "faults" / "reference"
    cached = folder / "out"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    trace, events, log = folder / "trace.tsv", folder / "progress.tsv", folder / "run.log"
    code, output = finish(
        start_run(
            _shared(root) / "run.toml", cached, {"MERGEQ_FAULT": f"trace@{trace},progress@{events}"}, log, quiet=False
        ),
        log,
    )
    assert code == 0, output
    seconds = {m.group(1): float(m.group(2)) for m in re.finditer(r"stage (\w+): done in ([\d.]+) s", output)}
    assert set(seconds) == set(STAGES), output
    return Reference(cached, model_files(cached), seconds, _stage_points(trace, cached), _stage_events(events))


def _same_in_every_run(text: str) -> str:
    """`text` with temporary names (random per run: `.awq.tmp-k3j9x0ab`) made the same for every run."""
    return re.sub(r"\.tmp-[A-Za-z0-9_]+", ".tmp-*", text)


def _stage_events(progress: Path) -> dict[str, list[str]]:
    """The progress events of each stage, in order, as `progress@PATH` recorded them."""
    events: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for line in _same_in_every_run(progress.read_text()).splitlines():
        stage, number, event = line.split("\t", 2)
        if stage in events:
            assert int(number) == len(events[stage]) + 1, f"{progress}: events of {stage} out of order"
            events[stage].append(event)
    return events


def _stage_points(trace: Path, out: Path) -> dict[str, list[int]]:
    """Commit points of each stage, renumbered for a run in which the earlier stages are already done
    (such a run commits resolved_config.json, points 1 and 2, then goes straight to that stage)."""
    owner: list[str | None] = []
    for line in trace.read_text().splitlines():
        final = Path(line.split("\t")[3])
        rel = final.relative_to(out) if final.is_relative_to(out) else None
        stage = None
        if rel is not None:
            head = rel.parts[0]
            for name, directory in STAGE_DIRS.items():
                if (
                    head == directory
                    or head.startswith(f".{directory}.tmp-")
                    or rel.as_posix() == f".mergeq/stages/{name}.json"
                ):
                    stage = name
        owner.append(stage)
    points = {}
    for name in STAGES:
        mine = [i for i, s in enumerate(owner) if s == name]
        points[name] = [3 + k for k in range(len(mine))]
    return points


def prefix_state(ref: Reference, out: Path, stage: str) -> None:
    """`out` as an earlier run left it just before `stage`: the stages before it done, nothing of it or after."""
    if stage == STAGES[0]:
        return
    shutil.copytree(ref.out, out, symlinks=True)
    for later in STAGES[STAGES.index(stage) :]:
        shutil.rmtree(out / STAGE_DIRS[later], ignore_errors=True)
        (out / ".mergeq" / "stages" / f"{later}.json").unlink(missing_ok=True)
    for name in ("summary.json", "summary.md", "summary.png"):
        (out / name).unlink(missing_ok=True)


@dataclass
class KillTrial:
    number: int
    stage: str
    how: str  # "progress" (held at a unit of work, then the process group killed) or "point" (a commit point)
    at: int  # the progress event's number within the stage, or the commit point
    event: str = ""  # the progress event's name, from the reference run
    killed: bool = False
    inside: bool | None = None  # held trials: the stage was unfinished when the kill landed (no stamp, no
    # output, its temporary directory there); commit points are not judged (one follows the stage's last rename)
    rerun_code: int | None = None
    redone: bool = False  # the rerun skipped exactly the finished stages and ran the rest
    identical: bool = False
    leftovers: list[str] | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.killed
            and self.inside is not False
            and self.rerun_code == 0
            and self.redone
            and self.identical
            and not self.leftovers
        )

    def label(self) -> str:
        where = f"event {self.at} ({self.event})" if self.how == "progress" else f"commit point {self.at}"
        return f"kill-{self.number:02d} {self.stage} at {where}"


def plan_kills(ref: Reference, seed: int = KILL_SEED, per_stage: int = KILLS_PER_STAGE) -> list[KillTrial]:
    """Seeded kill points in every stage: units of real work (progress events) and commit points, each
    drawn from what the uninterrupted run recorded."""
    rng = random.Random(seed)
    trials = []
    for stage in STAGES:
        assert ref.events[stage] or ref.points[stage], f"stage {stage} recorded no progress and no commit"
        for k in range(per_stage):
            if (k % 2 == 0 and ref.events[stage]) or not ref.points[stage]:
                number = rng.randint(1, len(ref.events[stage]))
                trials.append(KillTrial(len(trials) + 1, stage, "progress", number, ref.events[stage][number - 1]))
            else:
                trials.append(KillTrial(len(trials) + 1, stage, "point", rng.choice(ref.points[stage])))
    return trials


def _stamp(out: Path, stage: str) -> Path:
    return out / ".mergeq" / "stages" / f"{stage}.json"


def _unfinished(out: Path, stage: str) -> str:
    """Why `stage` was not finished in `out` ("" if it looks finished or was never started)."""
    directory = STAGE_DIRS[stage]
    if _stamp(out, stage).exists() or (out / directory).exists():
        return ""
    temps = list(out.glob(f".{directory}.tmp-*"))
    return f"unfinished: no stamp, no {directory}/, its temporary {temps[0].name}" if temps else ""


def _wait_for(marker: Path, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _ran_and_skipped(log: str) -> tuple[list[str], list[str]]:
    return (re.findall(r"stage (\w+): done in", log), re.findall(r"stage (\w+): unchanged", log))


def run_kill(root: Path, ref: Reference, trial: KillTrial) -> KillTrial:
    """One trial: the stages before trial.stage done (as an earlier run left them), `mergeq run` killed at the
    trial's point in trial.stage, then run again to the end."""
    folder = Path(root) / "faults" / f"kill-{trial.number:02d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    out, marker = folder / "out", folder / "held.tsv"
    config = _shared(root) / "run.toml"
    prefix_state(ref, out, trial.stage)
    if trial.how == "progress":
        env = {"MERGEQ_FAULT": f"hold@{trial.stage}:{trial.at}:{marker}"}
    else:
        env = {"MERGEQ_FAULT": f"kill@{trial.at}"}
    log = folder / "killed.log"
    proc = start_run(config, out, env, log, group=True)
    try:
        if trial.how == "progress" and _wait_for(marker, proc):
            kill_group(proc)
        code = proc.wait(timeout=RUN_TIMEOUT)
    finally:
        kill_group(proc)  # nothing of the killed run may outlive it (a held run never ends by itself)
    trial.killed = code == -signal.SIGKILL
    if not trial.killed:
        trial.detail = f"the run ended by itself (exit {code}) before the kill point:\n{log.read_text()[-2000:]}"
        return trial
    held = _same_in_every_run(marker.read_text()) if marker.exists() else ""
    why = _unfinished(out, trial.stage)
    if trial.how == "progress":
        trial.inside = held == f"{trial.stage}\t{trial.at}\t{trial.event}\n" and bool(why)
        if not trial.inside:
            trial.detail = (
                f"the kill did not land inside the stage at {trial.event!r}: held {held!r}, {why or 'finished'}"
            )
            return trial
    expect_ran = [stage for stage in STAGES if not _stamp(out, stage).exists()]
    rerun_log = folder / "rerun.log"
    trial.rerun_code, output = finish(start_run(config, out, log=rerun_log, quiet=False), rerun_log)
    ran, skipped = _ran_and_skipped(output)
    trial.redone = ran == expect_ran and skipped == [stage for stage in STAGES if stage not in expect_ran]
    files = model_files(out)
    trial.identical = files == ref.files
    trial.leftovers = temp_leftovers(out)
    if trial.rerun_code != 0:
        trial.detail = output[-3000:]
    elif not trial.redone:
        trial.detail = f"the rerun ran {ran} and skipped {skipped}; expected to run {expect_ran}"
    elif not trial.identical:
        differ = sorted(k for k in set(files) | set(ref.files) if files.get(k) != ref.files.get(k))
        trial.detail = f"artifacts differ from the uninterrupted run: {differ}"
    if trial.ok:
        shutil.rmtree(folder, ignore_errors=True)
    return trial


def kill_and_resume(root: Path, ref: Reference, workers: int = 2) -> list[KillTrial]:
    trials = plan_kills(ref)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda t: run_kill(root, ref, t), trials))


def two_runs(root: Path, ref: Reference) -> Outcome:
    """A second `mergeq run` on an output directory that a first run is writing: it refuses, clearly, and
    writes nothing; the first then finishes with exactly the artifacts of a run alone."""
    folder = _fresh(root, "two-runs")
    out, release, log = folder / "out", folder / "release", folder / "first.log"
    first = start_run(_shared(root) / "run.toml", out, {"MERGEQ_FAULT": f"wait@1:{release}"}, log)
    lock = out / ".mergeq" / "lock"
    deadline = time.monotonic() + RUN_TIMEOUT
    while first.poll() is None and time.monotonic() < deadline:
        if lock.is_file() and lock.read_text().strip() == str(first.pid):
            break
        time.sleep(0.05)
    before = snapshot(out)
    code, output = run_inprocess(["run", str(_shared(root) / "run.toml"), "--out", str(out)])
    new, lost = compare(before, snapshot(out))
    outcome = Outcome(
        "two-runs",
        "fault",
        "a second mergeq run on the output directory of a running one",
        code,
        output,
        check_fragments(output, ["another mergeq run", f"pid {first.pid}", str(out)]),
        new,
        lost,
    )
    release.touch()
    first_code, first_output = finish(first, log)
    if first_code != 0:
        outcome.problems.append(f"the first run failed (exit {first_code}): {first_output[-2000:]}")
    elif model_files(out) != ref.files:
        outcome.problems.append("the first run's artifacts differ from an uninterrupted run's: outputs mixed")
    if temp_leftovers(out):
        outcome.problems.append(f"temporary files left: {temp_leftovers(out)}")
    return outcome


def all_faults(root: Path, ref: Reference) -> list[Outcome]:
    """Every fault except the kills (see kill_and_resume)."""
    real = [enospc_real_disk(root)] if real_disk_available() else []
    return [
        enospc_merge(root),
        enospc_gguf(root),
        enospc_awq(root),
        *real,
        tool_fault(root, "crash", "convert_hf_to_gguf.py"),
        tool_fault(root, "crash", "llama-quantize"),
        tool_fault(root, "killtool", "llama-quantize"),
        two_runs(root, ref),
    ]
