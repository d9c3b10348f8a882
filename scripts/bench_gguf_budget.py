#!/usr/bin/env python
"""Benchmark: size-budgeted GGUF mixes against llama.cpp's named mixes at equal size, on the demo model.

    .venv/bin/python scripts/bench_gguf_budget.py [--model DIR] [--calib-chars 30000]

Three exports, each in its own process, run at the same time (on a shared 2-core machine one after the other
would take hours; CPU seconds, the process's and its tools', are the cost that does not depend on the load):
    plain   --quant Q4_K_M --imatrix --calib C                      (with evaluation)
    budget  --target like:Q4_K_M --imatrix --calib C                (search, export, evaluation: one target)
    q3      --quant Q3_K_M --target like:Q3_K_M --imatrix --calib C (with evaluation)
Every file is evaluated the standard way (the demo's eval.txt against the merged checkpoint, llama.cpp's KL;
the reference cache is warmed first). Targets: each mix's mean KL at most 0.7x its named type's, at no more
bytes; budget's CPU seconds at most 3x plain's. C is the first --calib-chars characters of the demo's
calib.txt (the whole text makes llama-imatrix run 152 chunks: minutes per run on 2 cores).

The model defaults to the demo merged model: the demo adapter merged into the demo base by `mergeq merge`
(made once under ~/.cache/mergeq/bench/demo-merged).
"""

from __future__ import annotations

import argparse
import json
import logging
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

KL_TARGET = 0.7
COST_TARGET = 3.0


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def demo_merged() -> Path:
    from mergeq.core.paths import cache_root
    from mergeq.demo import demo_assets

    assets = demo_assets()
    out = cache_root() / "bench" / "demo-merged"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mergeq.cli",
                "-q",
                "merge",
                "--base",
                str(assets.base),
                "--adapter",
                str(assets.adapter),
                "--out",
                str(tmp),
                "--no-validate",
            ],
            cwd=ROOT,
            check=True,
        )
        os.replace(tmp, out)
    return out


def export(model: Path, out: Path, calib: Path, eval_text: Path, quants: tuple[str, ...], targets: tuple[str, ...]):
    from exporters.eval_options import EvalOptions
    from exporters.gguf import GGUFOptions
    from mergeq.exporting import run_export

    options = GGUFOptions(quants=quants, imatrix=True, calib=calib, targets=targets)
    started, cpu = time.perf_counter(), cpu_seconds()
    reports = run_export("gguf", model, out, options, EvalOptions(text=eval_text))
    return {r.quant: r for r in reports}, time.perf_counter() - started, cpu_seconds() - cpu


def run_one(args) -> int:
    """One export in this process: its reports and its wall and CPU seconds go to KEEP/NAME.json."""
    from mergeq.demo import demo_assets

    os.environ["MERGEQ_QUIET"] = "1"
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.keep)
    quants = tuple(q for q in args.quants.split(",") if q)
    targets = tuple(t for t in args.targets.split(",") if t)
    reports, wall, cpu = export(
        args.model, work / args.one, work / "calib.txt", demo_assets().eval_text, quants, targets
    )
    (work / f"{args.one}.json").write_text(
        json.dumps(
            {
                "wall": wall,
                "cpu": cpu,
                "reports": {q: str(Path(r.path).parent / "report.json") for q, r in reports.items()},
            }
        )
    )
    return 0


def row(name: str, r) -> str:
    q = r.quality
    return (
        f"| {name} | {r.size.size_bytes / 2**20:.2f} | {r.size.bits_per_weight:.2f} | {q.perplexity:.3f} "
        f"| {q.kl_divergence:.5f} | {q.top1_agreement:.3f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="merged checkpoint (default: the demo merged model)")
    parser.add_argument("--calib-chars", type=int, default=30000, help="characters of the demo calib.txt used")
    parser.add_argument("--keep", type=Path, help="keep the outputs in this folder")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one export, write NAME.json
    parser.add_argument("--quants", default="", help=argparse.SUPPRESS)
    parser.add_argument("--targets", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(args)
    logging.basicConfig(level=logging.WARNING)
    os.environ["MERGEQ_QUIET"] = "1"

    from exporters.llamacpp.build import ensure_built
    from exporters.report import load_report
    from mergeq.demo import demo_assets

    ensure_built()
    assets = demo_assets()
    model = args.model or demo_merged()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-gguf-budget-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib.txt"
    calib.write_text(assets.calib_text.read_text(encoding="utf-8")[: args.calib_chars], encoding="utf-8")
    rows, ok = [], True
    jobs = {"plain": (("Q4_K_M",), ()), "budget": ((), ("like:Q4_K_M",)), "q3": (("Q3_K_M",), ("like:Q3_K_M",))}
    try:
        from exporters.evaluate import evaluate_full

        evaluate_full(model, model, assets.eval_text)  # warms the reference cache every run reads
        procs = {
            name: subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    name,
                    "--model",
                    str(model),
                    "--keep",
                    str(work),
                    "--quants",
                    ",".join(q),
                    "--targets",
                    ",".join(t),
                ],
                cwd=ROOT,
            )
            for name, (q, t) in jobs.items()
        }
        for name, proc in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"the {name} export failed (exit {proc.returncode})")
        results = {name: json.loads((work / f"{name}.json").read_text()) for name in jobs}
        reports = {name: {q: load_report(Path(p)) for q, p in r["reports"].items()} for name, r in results.items()}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    pairs = {
        "Q4_K_M": {"Q4_K_M": reports["plain"]["Q4_K_M"], "MIX-like-Q4_K_M": reports["budget"]["MIX-like-Q4_K_M"]},
        "Q3_K_M": reports["q3"],
    }
    plain_s, plain_cpu = results["plain"]["wall"], results["plain"]["cpu"]
    budget_s, budget_cpu = results["budget"]["wall"], results["budget"]["cpu"]
    budget_reports = reports["budget"]
    print(
        f"GGUF size budgets on {model} (imatrix from {args.calib_chars} characters of the demo calib.txt; "
        f"evaluated on the demo eval.txt against the merged checkpoint)\n"
    )
    print("| artifact | MiB | bits/weight | ppl | KL | top-1 |\n|---|---|---|---|---|---|")
    for t, reports in pairs.items():
        plain, mix = reports[t], reports[f"MIX-like-{t}"]
        rows.append((t, plain, mix))
        print(row(f"{t} (llama.cpp named mix)", plain))
        print(row(f"mergeq mix at {t}'s size", mix))
    print()
    for t, plain, mix in rows:
        ratio = mix.quality.kl_divergence / plain.quality.kl_divergence
        fits = mix.size.size_bytes <= plain.size.size_bytes
        good = ratio <= KL_TARGET and fits
        ok &= good
        budget = mix.extra["budget"]
        print(
            f"{t}: KL ratio mix / named {ratio:.3f} (target <= {KL_TARGET}), {mix.size.size_bytes:,} <= "
            f"{plain.size.size_bytes:,} bytes: {fits}; on the calibration text predicted KL "
            f"{budget['predicted_kl']:.5f}, measured {budget['measured']['kl']:.5f} (named: "
            f"{budget['named_mix']['kl']:.5f}): {'OK' if good else 'MISSED'}"
        )
    cost = budget_cpu / plain_cpu
    ok &= cost <= COST_TARGET
    search = budget_reports["MIX-like-Q4_K_M"].extra["budget"]["search"]["seconds"]
    print(
        f"cost: plain `--quant Q4_K_M` export + eval {plain_cpu:.1f} s CPU ({plain_s:.1f} s wall); "
        f"`--target like:Q4_K_M` search + export + eval {budget_cpu:.1f} s CPU ({budget_s:.1f} s wall); "
        f"ratio {cost:.2f} CPU (target <= {COST_TARGET}): {'OK' if cost <= COST_TARGET else 'MISSED'} "
        f"(wall ratio {budget_s / plain_s:.2f}, the three exports ran at the same time)"
    )
    print("search stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in search.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
