#!/usr/bin/env python
"""Benchmark: `mergeq export gguf` (convert + two quantization types, evaluation off) against the same
pinned llama.cpp tools run by hand, in one run, on the same checkpoint.

    .venv/bin/python scripts/bench_gguf.py [--model DIR] [--quant Q8_0 --quant Q4_K_M] [--repeats 3]

"By hand" is what a user would type: the pinned convert_hf_to_gguf.py to an f16 GGUF (with the pinned
gguf-py), then llama-quantize once per type. "mergeq" is `run_export` as `mergeq export gguf --no-eval` and
the pipeline call it: preflight, the same tools, hashing the inputs, reading the files back, the reports.
"mergeq CLI" is the same through a fresh `mergeq` process, so its start-up is included (shown, not the
target). They alternate, each `--repeats` times, and the fastest of each is compared (the machine is
shared; the minimum is the least disturbed run). Target: ratio <= 1.1. llama.cpp is built before timing.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET = 1.1


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def by_hand(model: Path, work: Path, quants: list[str]) -> float:
    from exporters.llamacpp.layout import layout

    where = layout()
    env = {**os.environ, "PYTHONPATH": str(where.gguf_py)}
    env.pop("NO_LOCAL_GGUF", None)
    f16 = work / "model-f16.gguf"
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, str(where.converter), str(model), "--outfile", str(f16), "--outtype", "f16"],
        env=env,
        check=True,
        capture_output=True,
    )
    for quant in quants:
        subprocess.run(
            [str(where.bin / "llama-quantize"), str(f16), str(work / f"model-{quant}.gguf"), quant],
            check=True,
            capture_output=True,
        )
    return time.perf_counter() - started


def with_mergeq(model: Path, work: Path, quants: list[str]) -> float:
    """mergeq's export as the CLI and the pipeline run it: preflight, export, reports (evaluation off)."""
    from exporters.eval_options import EvalOptions
    from exporters.gguf import GGUFOptions
    from mergeq.exporting import run_export

    started = time.perf_counter()
    run_export("gguf", model, work, GGUFOptions(quants=tuple(quants)), EvalOptions(enabled=False))
    return time.perf_counter() - started


def with_mergeq_cli(model: Path, work: Path, quants: list[str]) -> float:
    """The same through `mergeq export gguf --no-eval` in a fresh process (adds the CLI's start-up)."""
    argv = [
        sys.executable,
        "-m",
        "mergeq.cli",
        "-q",
        "export",
        "gguf",
        "--model",
        str(model),
        "--out",
        str(work),
        "--no-eval",
    ]
    for quant in quants:
        argv += ["--quant", quant]
    started = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint (default: the demo base)")
    parser.add_argument("--quant", action="append", help="types (default: Q8_0 and Q4_K_M)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quants = args.quant or ["Q8_0", "Q4_K_M"]

    from exporters.llamacpp.build import ensure_built

    ensure_built()
    if args.model is None:
        from mergeq.demo import demo_base

        args.model = demo_base()
    os.environ["MERGEQ_QUIET"] = "1"
    runners = {"by hand": by_hand, "mergeq": with_mergeq, "mergeq CLI": with_mergeq_cli}
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        for repeat in range(args.repeats):
            order = list(runners.items())
            if repeat % 2:
                order.reverse()
            for name, run in order:
                work = Path(tmp) / f"{name.replace(' ', '-')}-{repeat}"
                work.mkdir()
                before = cpu_seconds()
                times[name].append(run(args.model, work, quants))
                cpu[name].append(cpu_seconds() - before)
                shutil.rmtree(work)
    best = {name: min(values) for name, values in times.items()}
    best_cpu = {name: min(values) for name, values in cpu.items()}
    ratio = best["mergeq"] / best["by hand"]
    print(f"GGUF export of {args.model} to {', '.join(quants)} ({args.repeats} runs each, evaluation excluded)")
    print(f"{'':11} {'wall s':>7} {'ratio':>6}  {'cpu s':>7} {'ratio':>6}  wall of each run")
    for name, values in times.items():
        print(
            f"{name:11} {best[name]:7.2f} {best[name] / best['by hand']:6.3f}  {best_cpu[name]:7.2f} "
            f"{best_cpu[name] / best_cpu['by hand']:6.3f}  " + " ".join(f"{v:.2f}" for v in values)
        )
    print(
        f"ratio mergeq / by hand (fastest wall time): {ratio:.3f} (target <= {TARGET}): "
        f"{'OK' if ratio <= TARGET else 'OVER TARGET'}"
    )
    print(
        "(cpu: user+system seconds of mergeq's process and every tool it ran, a check that does not depend on "
        "the machine's load; mergeq CLI adds the `mergeq` start-up, which imports every exporter's dependencies)"
    )
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
