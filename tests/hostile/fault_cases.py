"""The fault set of issue 7, run through the CLI on the corpus's tiny models (tests/hostile/make_corpus.py).

- a full disk (ENOSPC, injected by MERGEQ_FAULT=enospc@NAME at the commit of an atomic writer) during a merge and
  during GGUF and AWQ exports over a previous artifact: clear error with the space needed, the previous artifact
  byte-identical, no temporary file left;
- a llama.cpp tool (converter, llama-quantize) that crashes or is SIGKILLed mid-quantization;
- two `mergeq run` on one output directory: the second refuses while the first runs, the first's outputs are
  those of a run alone;
- `kill -9` of `mergeq run` inside each stage (merge, gguf, awq, gptq), at seeded random times and at seeded
  random commit points, each followed by a rerun that must finish with artifacts byte-identical to an
  uninterrupted run's.
"""

from __future__ import annotations

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

from harness import (Outcome, check_fragments, compare, mergeq_command, model_files, run_inprocess, snapshot,
                     subprocess_env, temp_leftovers, REPO)

STAGES = ("merge", "gguf", "awq", "gptq")
STAGE_DIRS = {"merge": "merged", "gguf": "gguf", "awq": "awq", "gptq": "gptq"}
KILL_SEED = 20261123
KILLS_PER_STAGE = 5  # 20 kills in all
RUN_TIMEOUT = 600


def _shared(root: Path) -> Path:
    return Path(root) / "shared"


def _fresh(root: Path, name: str) -> Path:
    folder = Path(root) / "faults" / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _judge(name: str, what: str, folder: Path, argv: list[str], expect: list[str], env: dict[str, str],
           code_wanted: int | None = None) -> Outcome:
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
    return _judge("enospc-merge", "disk full while writing the merged checkpoint over a previous one", folder,
                  [*argv[:4], f"{s / 'adapter'}@0.5", *argv[5:], "--overwrite"],
                  ["no space left", str(prev), "needs at least"], {"MERGEQ_FAULT": f"enospc@{prev.name}"}, 2)


def enospc_gguf(root: Path) -> Outcome:
    s = _shared(root)
    folder = _fresh(root, "enospc-gguf")
    out = folder / "gguf"
    argv = ["export", "gguf", "--model", str(s / "merged"), "--out", str(out), "--quant", "Q8_0", "--no-eval"]
    code, output = run_inprocess(argv)
    assert code == 0, output
    return _judge("enospc-gguf", "disk full while llama-quantize's output is committed over a previous GGUF",
                  folder, argv, ["no space left", str(out / "Q8_0"), "needs at least"],
                  {"MERGEQ_FAULT": "enospc@Q8_0"}, 2)


def enospc_awq(root: Path) -> Outcome:
    s = _shared(root)
    folder = _fresh(root, "enospc-awq")
    out = folder / "awq"
    argv = ["export", "awq", "--model", str(s / "merged"), "--out", str(out), "--no-eval", "--calib",
            str(s / "calib.txt"), "--group-size", "32", "--samples", "4", "--seq-len", "32"]
    code, output = run_inprocess(argv)
    assert code == 0, output
    return _judge("enospc-awq", "disk full while writing an AWQ checkpoint over a previous one", folder, argv,
                  ["no space left", str(out), "needs at least"], {"MERGEQ_FAULT": f"enospc@{out.name}"}, 2)


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
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
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
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", _REAL_DISK_SCRIPT, "sh", *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    read = lambda name: (logs / name).read_text() if (logs / name).exists() else ""  # noqa: E731
    outcome = Outcome("enospc-real-disk", "fault", "a real full disk (small tmpfs) while overwriting a merge",
                      int(read("second.code") or -1), read("second.log"),
                      check_fragments(read("second.log"), ["no space left", "merged", "needs at least"]))
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
    outcome = _judge(name, f"{tool} {'killed (SIGKILL)' if mode == 'killtool' else 'crashes (SIGABRT)'} mid-run",
                     folder, argv, [tool, signal_text, "injected fault"], {"MERGEQ_FAULT": f"{mode}@{tool}"}, 3)
    gguf_files = [p for p in outcome.leftovers if p.endswith(".gguf")]
    if gguf_files:
        outcome.problems.append(f"finished-looking GGUF files left: {gguf_files}")
    return outcome


# ------------------------------------------------------------------------------------------ pipeline runs


def start_run(config: Path, out: Path, env: dict[str, str] | None = None, log: Path | None = None,
              quiet: bool = True) -> subprocess.Popen:
    argv = mergeq_command(*(["-q"] if quiet else []), "run", str(config), "--out", str(out))
    sink = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(argv, env=subprocess_env(**(env or {})), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path | None) -> tuple[int, str]:
    code = proc.wait(timeout=RUN_TIMEOUT)
    return code, log.read_text() if log and log.exists() else ""


@dataclass
class Reference:
    out: Path
    files: dict[str, str]
    seconds: dict[str, float]  # stage -> duration of that stage in the uninterrupted run
    points: dict[str, list[int]]  # stage -> commit points (numbered as in a run that starts at that stage)


def reference_run(root: Path) -> Reference:
    """One uninterrupted `mergeq run` of the shared config, traced: its artifacts are what every resumed run
    must reproduce byte for byte."""
    folder = Path(root) / "faults" / "reference"
    cached = folder / "out"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    trace, log = folder / "trace.tsv", folder / "run.log"
    code, output = finish(start_run(_shared(root) / "run.toml", cached, {"MERGEQ_FAULT": f"trace@{trace}"}, log,
                                    quiet=False), log)
    assert code == 0, output
    seconds = {m.group(1): float(m.group(2)) for m in re.finditer(r"stage (\w+): done in ([\d.]+) s", output)}
    assert set(seconds) == set(STAGES), output
    return Reference(cached, model_files(cached), seconds, _stage_points(trace, cached))


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
                if head == directory or head.startswith(f".{directory}.tmp-") or rel.as_posix() == \
                        f".mergeq/stages/{name}.json":
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
    for later in STAGES[STAGES.index(stage):]:
        shutil.rmtree(out / STAGE_DIRS[later], ignore_errors=True)
        (out / ".mergeq" / "stages" / f"{later}.json").unlink(missing_ok=True)
    for name in ("summary.json", "summary.md", "summary.png"):
        (out / name).unlink(missing_ok=True)


@dataclass
class KillTrial:
    number: int
    stage: str
    how: str  # "time" or "point"
    at: float  # seconds after the stage started, or the commit point
    killed: bool = False
    rerun_code: int | None = None
    identical: bool = False
    leftovers: list[str] | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.killed and self.rerun_code == 0 and self.identical and not self.leftovers

    def label(self) -> str:
        where = f"{self.at:.2f} s into the stage" if self.how == "time" else f"commit point {int(self.at)}"
        return f"kill-{self.number:02d} {self.stage} at {where}"


def plan_kills(ref: Reference, seed: int = KILL_SEED, per_stage: int = KILLS_PER_STAGE) -> list[KillTrial]:
    rng = random.Random(seed)
    trials = []
    for stage in STAGES:
        for k in range(per_stage):
            if k % 2 == 0 or not ref.points[stage]:
                at = rng.uniform(0.0, 0.9 * max(ref.seconds[stage], 0.2))
                trials.append(KillTrial(len(trials) + 1, stage, "time", at))
            else:
                trials.append(KillTrial(len(trials) + 1, stage, "point", rng.choice(ref.points[stage])))
    return trials


def _stage_started(out: Path, stage: str) -> bool:
    directory = STAGE_DIRS[stage]
    return out.is_dir() and any(out.glob(f".{directory}.tmp-*"))


def run_kill(root: Path, ref: Reference, trial: KillTrial) -> KillTrial:
    """One trial; a timed kill that came after the run had already finished is retried at half the delay."""
    for _ in range(4):
        trial = _run_kill_once(root, ref, trial)
        if trial.killed or trial.how != "time":
            return trial
        trial.at /= 2
    return trial


def _run_kill_once(root: Path, ref: Reference, trial: KillTrial) -> KillTrial:
    folder = Path(root) / "faults" / f"kill-{trial.number:02d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    out = folder / "out"
    config = _shared(root) / "run.toml"
    prefix_state(ref, out, trial.stage)
    env = {"MERGEQ_FAULT": f"kill@{int(trial.at)}"} if trial.how == "point" else {}
    log = folder / "killed.log"
    proc = start_run(config, out, env, log)
    if trial.how == "time":
        while proc.poll() is None and not _stage_started(out, trial.stage):
            time.sleep(0.01)
        deadline = time.monotonic() + trial.at
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # the main process only, as `kill -9 PID` does
    code = proc.wait(timeout=RUN_TIMEOUT)
    trial.killed = code == -signal.SIGKILL
    if not trial.killed:
        trial.detail = f"the run ended by itself (exit {code}) before the kill point"
        return trial
    rerun_log = folder / "rerun.log"
    trial.rerun_code, output = finish(start_run(config, out, log=rerun_log), rerun_log)
    files = model_files(out)
    trial.identical = files == ref.files
    trial.leftovers = temp_leftovers(out)
    if trial.rerun_code != 0:
        trial.detail = output[-3000:]
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
    outcome = Outcome("two-runs", "fault", "a second mergeq run on the output directory of a running one", code,
                      output, check_fragments(output, ["another mergeq run", f"pid {first.pid}", str(out)]), new,
                      lost)
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
    return [enospc_merge(root), enospc_gguf(root), enospc_awq(root), *real,
            tool_fault(root, "crash", "convert_hf_to_gguf.py"), tool_fault(root, "crash", "llama-quantize"),
            tool_fault(root, "killtool", "llama-quantize"), two_runs(root, ref)]
