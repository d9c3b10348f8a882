"""Should `mergeq run` export concurrently? Sequential against concurrent exports of one merged checkpoint.

    .venv/bin/python scripts/bench_pipeline.py [--merged DIR] [--work DIR]

Runs `mergeq export gguf` (Q8_0 + Q4_K_M), `export awq` and `export gptq` (group size 64), evaluation
included, as separate processes: first one after another, then all at once, then all at once with torch
limited to one thread each. The reference log-probabilities are cached first, so no run pays for them.
Prints each wall time, the ratio of each concurrent variant to the sequential run, and which artifacts
differ from the sequential ones (with the same thread count none may; with one torch thread GPTQ's float
sums run in another order). Without --merged it merges the demo first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPORTS = {  # the demo's own texts, named (mergeq has no default text)
    "gguf": ["--quant", "Q8_0", "--quant", "Q4_K_M", "--eval-text", "demo"],
    "awq": ["--group-size", "64", "--calib", "demo", "--eval-text", "demo"],
    "gptq": ["--group-size", "64", "--calib", "demo", "--eval-text", "demo"],
}
DOC_FILES = {"report.json", "report.md", "README.md"}


def mergeq(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mergeq.cli", "-q", *argv],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{err[-3000:]}")


def export_all(merged: Path, out: Path, concurrent: bool, env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall seconds of each export and of the whole set."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    running = []
    for target, options in EXPORTS.items():
        begin = time.perf_counter()
        proc = mergeq("export", target, "--model", str(merged), "--out", str(out / target), *options, env=env)
        if concurrent:
            running.append((target, begin, proc))
        else:
            wait(proc, f"export {target}")
            seconds[target] = time.perf_counter() - begin
    for target, begin, proc in running:
        wait(proc, f"export {target}")
        seconds[target] = time.perf_counter() - begin
    seconds["all"] = time.perf_counter() - started
    return seconds


def model_files(out: Path) -> dict[str, str]:
    from mergeq.stages import tree_hashes

    return {rel: digest for rel, digest in tree_hashes(out).items() if Path(rel).name not in DOC_FILES}


def merge_demo(work: Path) -> Path:
    from mergeq.demo import demo_assets

    assets = demo_assets()
    merged = work / "merged"
    wait(
        mergeq(
            "merge",
            "--base",
            str(assets.base),
            "--qlora-base",
            str(assets.base_nf4),
            "--adapter",
            str(assets.adapter),
            "--out",
            str(merged),
        ),
        "merge",
    )
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--merged", type=Path, help="merged checkpoint to export (default: merge the demo)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed after)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mergeq-bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        merged = args.merged or merge_demo(work)
        print(f"cores: {os.cpu_count()}; caching the reference of {merged} ...", flush=True)
        wait(mergeq("eval", "--model", str(merged)), "reference evaluation")
        variants = {
            "sequential": (False, None),
            "concurrent": (True, None),
            "concurrent, 1 torch thread each": (True, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
        }
        results, files = {}, {}
        for name, (concurrent, env) in variants.items():
            out = work / name.split(",")[0].replace(" ", "-") / ("1t" if env else "default")
            print(f"{name} ...", flush=True)
            results[name] = export_all(merged, out, concurrent, env)
            files[name] = model_files(out)
        base = results["sequential"]["all"]
        print(f"\n| variant | {' | '.join(EXPORTS)} | all (s) | ratio to sequential |")
        print(f"|---|{'---|' * len(EXPORTS)}---|---|")
        for name, seconds in results.items():
            cells = " | ".join(f"{seconds[t]:.1f}" for t in EXPORTS)
            print(f"| {name} | {cells} | {seconds['all']:.1f} | {seconds['all'] / base:.2f} |")
        differ = {
            name: sorted(k for k in set(f) | set(files["sequential"]) if f.get(k) != files["sequential"].get(k))
            for name, f in files.items()
        }
        for name, paths in differ.items():
            print(f"{name}: {'byte-identical to sequential' if not paths else 'differs in ' + ', '.join(paths)}")
        print(json.dumps({"cores": os.cpu_count(), "seconds": results, "differ": differ}))
        if differ["concurrent"]:  # same thread count: must be the same bytes
            sys.exit("concurrent exports wrote other bytes than sequential ones")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
