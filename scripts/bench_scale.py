#!/usr/bin/env python
"""Benchmark: a default `mergeq run` on a model larger than the memory it runs in.

Writes a synthetic checkpoint with Llama-3.1-8B's shapes (hidden 4096, intermediate 14336, 32 query and 8
key/value heads, vocabulary 128256; 32 layers, about 16 GB in fp16, sharded) and a rank-16 LoRA on every linear
layer, then runs `mergeq run` with the default stages inside a hard memory limit (a cgroup, 6 GiB by default):
merge with validation, GGUF Q4_K_M with evaluation, GPTQ with evaluation. The calibration and evaluation
budgets are small (8 x 256 calibration tokens, two 512-token evaluation windows) to bound CPU time; memory
does not depend on them beyond the activations.

It prints wall time and peak RSS of every stage (from the stage reports: mergeq's own peak, or the largest
child tool's), the cgroup's high-water mark, and the same figures for a plain PEFT merge (load +
merge_and_unload + save) run without the limit. Target: the run completes under the limit, and no stage's
peak exceeds 1 GiB plus three times the largest tensor. With `--at-bound` the cgroup is that bound itself: a run
that finishes inside it never needed more, whatever the RSS of a tool that maps its file (below).

    .venv/bin/python scripts/bench_scale.py                       # 8B shapes, 32 layers: ~16 GB, ~55 GB of disk
    .venv/bin/python scripts/bench_scale.py --at-bound --no-peft  # inside a cgroup of the bound (3.94 GiB)
    .venv/bin/python scripts/bench_scale.py --layers 12           # the same widths, 12 layers (~7.3 GB)
    .venv/bin/python scripts/bench_scale.py --limit-gib 6 --workdir /big/disk/scale
    .venv/bin/python scripts/bench_scale.py --layers 1 --only gptq --samples 2 --seq-len 128  # GPTQ's peak alone
    .venv/bin/python scripts/bench_scale.py --only gguf-eval   # the kept run's GGUF evaluation under the bound
    .venv/bin/python scripts/bench_scale.py --only peft        # the PEFT figures alone

llama.cpp's tools cannot stream layers: llama-perplexity maps the whole GGUF (mergeq's evaluation never lets it
repack the weights into an anonymous copy: exporters/llamacpp/run.py, EVAL_WEIGHT_FLAGS). Where memory allows,
the file's pages stay resident, so the tool's peak RSS is about the file however small its own memory; the bench
prints that memory (its anonymous peak) beside it. After the run it evaluates each GGUF again with `mergeq eval`
inside a cgroup set to the bound itself, where the kernel drops and rereads the file's pages as needed, and
prints whether that finished, its time and its KL against the run's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

GiB = 1 << 30
LLAMA_31_8B = {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "vocab": 128256}


def build_inputs(work: Path, layers: int, rank: int) -> tuple[Path, Path, Path, Path]:
    import torch
    from int4_models import calibration_text
    from synthetic import LlamaShape, write_llama, write_lora
    from tiny_models import sentencepiece_tokenizer

    shape = LlamaShape(**{**LLAMA_31_8B, "layers": layers})
    tag = f"llama31-8b-shapes-l{layers}"
    base, adapter = work / tag, work / f"{tag}-lora-r{rank}"
    marker = base / "synthetic.json"
    if not marker.is_file() or json.loads(marker.read_text()) != {**shape.__dict__}:
        shutil.rmtree(base, ignore_errors=True)
        print(f"writing synthetic base {base} ({shape.params() / 1e9:.2f}B parameters, fp16) ...", flush=True)
        write_llama(base, shape, dtype=torch.float16, max_shard_bytes=2 * GiB)
        # a SentencePiece tokenizer llama.cpp's converter reads; the converter pads the vocabulary to 128256
        sentencepiece_tokenizer(base, vocab=320)
    if (
        not (adapter / "adapter_config.json").is_file()
        or json.loads((adapter / "adapter_config.json").read_text())["r"] != rank
    ):
        print(f"writing rank-{rank} LoRA on all linear layers {adapter} ...", flush=True)
        write_lora(adapter, shape, base, r=rank, alpha=2 * rank)
    calib = calibration_text(work / "calib.txt", chars=12000)
    text = calibration_text(work / "eval.txt", chars=2400, seed=1)  # two 512-token windows
    return base, adapter, calib, text


def write_config(work: Path, base: Path, adapter: Path, calib: Path, text: Path) -> Path:
    config = work / "run.toml"
    config.write_text(f"""[merge]
base = "{base}"
adapters = [{{ path = "{adapter}" }}]

[eval]
text = "{text}"

[gguf]
quant = ["Q4_K_M"]

[gptq]
group_size = 128
calib = "{calib}"
samples = 8
seq_len = 256
""")
    return config


def stage_rows(out: Path) -> list[dict]:
    rows = []
    for report in sorted(out.rglob("report.json")):
        data = json.loads(report.read_text())  # report.json keeps every step's cost in these two maps
        seconds, peaks = data.get("seconds", {}), data.get("peak_rss_bytes", {})
        # a GGUF's evaluation: llama-perplexity's own memory, without the model file it maps (exporters/eval_gguf.py)
        anon = data.get("provenance", {}).get("eval", {}).get("llama_perplexity_peak_anonymous_bytes")
        for name in seconds:
            row = {
                "artifact": str(report.parent.relative_to(out)),
                "step": name,
                "seconds": seconds[name],
                "peak_gib": peaks.get(name, 0) / GiB,
            }
            if name == "eval" and anon is not None:
                row["tool_anon_gib"] = anon / GiB
            rows.append(row)
    return rows


def bound_verdict(rows: list[dict], bound: int, limit: int) -> str:
    """The target, judged two ways: each step's peak RSS against the bound, and the hard limit the whole run
    finished inside. RSS counts the pages of files a tool maps (llama.cpp's tools map the GGUF), which the kernel
    drops and rereads under a limit; a run that finished inside a cgroup no larger than the bound never needed
    more than the bound, whatever the RSS."""
    worst = max(rows, key=lambda r: r["peak_gib"], default=None)
    peak = worst["peak_gib"] if worst else 0.0
    text = f"peak RSS {peak:.2f} GiB"
    if worst:
        text += f" ({' '.join(filter(None, (worst.get('artifact'), worst['step'])))})"
    text += f" vs 1 GiB + 3 x largest tensor = {bound / GiB:.2f} GiB"
    if peak * GiB <= bound:
        return text + ": ok"
    if limit <= bound:
        return text + f"; the whole run finished inside a {limit / GiB:.2f} GiB cgroup, at most the bound: ok"
    return text + f": MISSED (the run's cgroup, {limit / GiB:.2f} GiB, is above the bound; --at-bound tests it)"


def main() -> int:
    from memory_limit import run_limited, unavailable

    from mergeq.core.paths import cache_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=LLAMA_31_8B["layers"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--limit-gib", type=float, default=6.0)
    parser.add_argument(
        "--at-bound",
        action="store_true",
        help="run inside a cgroup of the target bound itself (1 GiB + 3 x the largest tensor) instead of --limit-gib",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: <cache>/bench-scale")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT merge run")
    parser.add_argument("--keep", action="store_true", help="keep the run's outputs")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="start from the output an earlier run left (killed, or --keep): stages already done are skipped, an "
        "int4 stage resumes at its next layer; their figures come from their reports",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--only",
        choices=["gptq", "gguf-eval", "peft"],
        help="gptq: only this int4 export (no evaluation) on the base, under the same limit (its peak per layer); "
        "gguf-eval: only the GGUF evaluation under the bound, on the output a --keep run left; "
        "peft: only the PEFT merge, without a limit",
    )
    parser.add_argument("--samples", type=int, default=8, help="--only: calibration samples")
    parser.add_argument("--seq-len", type=int, default=256, help="--only: tokens per calibration sample")
    args = parser.parse_args()
    if (why := unavailable()) is not None:
        raise SystemExit(f"no hard memory limit can be set here: {why}")

    work = args.workdir or cache_root() / "bench-scale"
    work.mkdir(parents=True, exist_ok=True)
    base, adapter, calib, text = build_inputs(work, args.layers, args.rank)
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    largest = LLAMA_31_8B["vocab"] * LLAMA_31_8B["hidden"] * 2
    bound = 1 * GiB + 3 * largest
    config = write_config(work, base, adapter, calib, text)
    out = work / "out"
    if args.only in (None, "gptq") and not args.resume:  # --only gguf-eval and peft read or leave a kept run
        shutil.rmtree(out, ignore_errors=True)

    limit = bound if args.at_bound else int(args.limit_gib * GiB)
    if args.only == "gguf-eval":
        bound_checks(out, text, bound)
        return 0
    if args.only == "peft":
        print_peft(peft_run(work, base, adapter))
        return 0
    if args.only:
        return only_export(args, base, calib, out, limit, bound)
    print(
        f"running mergeq run under a {limit / GiB:.2f} GiB cgroup on a {model_bytes / GiB:.2f} GiB model ...",
        flush=True,
    )
    env = {**os.environ, "MERGEQ_QUIET": "1"}
    started = time.perf_counter()
    run = run_limited(
        [sys.executable, "-m", "mergeq.cli", "run", str(config), "--out", str(out)],
        limit,
        env=env,
        cwd=ROOT,
        timeout=6 * 3600,
    )
    wall = time.perf_counter() - started
    if run.returncode != 0:
        print(run.stderr[-4000:])
        raise SystemExit(f"mergeq run failed (exit {run.returncode}, OOM-killed: {run.oom_killed}) after {wall:.0f} s")
    rows = stage_rows(out)
    log = " ".join(run.stderr.split())
    stage_walls = {name: float(seconds) for name, seconds in re.findall(r"stage (\w+): done in ([\d.]+) s", log)}
    print("running mergeq run again on the finished output (every stage up to date) ...", flush=True)
    started = time.perf_counter()
    rerun = run_limited(
        [sys.executable, "-m", "mergeq.cli", "run", str(config), "--out", str(out), "--json"],
        limit,
        env=env,
        cwd=ROOT,
        timeout=3600,
    )
    skip_s = time.perf_counter() - started
    skipped = json.loads(rerun.stdout).get("skipped", []) if rerun.returncode == 0 else []
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    checks = bound_checks(out, text, bound)
    peft = None if args.no_peft else peft_run(work, base, adapter)

    print()
    print(
        f"model: synthetic, Llama-3.1-8B widths, {args.layers} layers, {model_bytes / GiB:.2f} GiB fp16; "
        f"LoRA r={args.rank} on every linear; largest tensor {largest / 2**20:.0f} MiB"
    )
    print(
        f"mergeq run (merge+validation, GGUF Q4_K_M + eval, GPTQ + eval) under a {limit / GiB:.2f} GiB cgroup: "
        f"{wall:.0f} s, cgroup high-water mark {(run.max_usage_bytes or 0) / GiB:.2f} GiB (page cache included)"
    )
    print("stage wall times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stage_walls.items()))
    print(f"{'artifact':<24} {'step':<14} {'wall s':>8} {'peak GiB':>9}")
    for row in rows:
        anon = f"  (llama-perplexity's own memory {row['tool_anon_gib']:.2f} GiB)" if "tool_anon_gib" in row else ""
        print(f"{row['artifact']:<24} {row['step']:<14} {row['seconds']:>8.1f} {row['peak_gib']:>9.2f}{anon}")
    print("largest stage " + bound_verdict(rows, bound, limit))
    if any("tool_anon_gib" in row for row in rows):
        print(
            "(a GGUF's evaluation: llama-perplexity maps the file and never copies it; its peak RSS counts the "
            "file's pages, which the kernel drops under pressure, its own memory is the anonymous part; the "
            "checks below run it inside a cgroup of the bound)"
        )
    print(
        f"rerun on the finished output ({on_disk / GiB:.1f} GiB of outputs): {skip_s:.1f} s, skipped "
        f"{', '.join(skipped) or 'nothing'} (exit {rerun.returncode}); file stamps spare re-reading unchanged files"
    )
    if peft is not None:
        print_peft(peft)
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "layers": args.layers,
                    "model_gib": model_bytes / GiB,
                    "wall_s": wall,
                    "limit_gib": limit / GiB,
                    "cgroup_max_gib": (run.max_usage_bytes or 0) / GiB,
                    "stages": rows,
                    "stage_wall_s": stage_walls,
                    "bound_gib": bound / GiB,
                    "peft": peft,
                    "rerun_s": skip_s,
                    "rerun_skipped": skipped,
                    "outputs_gib": on_disk / GiB,
                    "gguf_eval_under_bound": checks,
                },
                indent=2,
            )
            + "\n"
        )
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


def peft_run(work: Path, base: Path, adapter: Path) -> dict:
    from bench_merge import PEFT_JOB, run_job

    print("running PEFT load + merge_and_unload + save (no limit) ...", flush=True)
    try:
        return run_job("peft", PEFT_JOB, base, adapter, work / "out-peft")
    finally:
        shutil.rmtree(work / "out-peft", ignore_errors=True)


def print_peft(peft: dict) -> None:
    wall, cpu, peak = peft["wall_s"], peft["cpu_s"], peft["peak_gib"]
    print(f"PEFT merge (no limit): {wall:.0f} s, CPU {cpu:.0f} s, peak RSS {peak:.2f} GiB")


def bound_checks(out: Path, text: Path, bound: int) -> list[dict]:
    """Each GGUF of the run evaluated again by `mergeq eval` inside a cgroup of `bound` bytes: does it finish,
    how long, and does its KL match the run's (the same, the weights mapped in both)."""
    from memory_limit import run_limited

    rows = []
    for gguf in sorted(out.glob("gguf/**/*.gguf")):
        run_kl = json.loads((gguf.parent / "report.json").read_text()).get("kl_divergence")
        argv = [sys.executable, "-m", "mergeq.cli", "eval", "--model", str(gguf), "--reference", str(out / "merged")]
        argv += ["--text", str(text), "--json"]
        # its pages out of the page cache first: cached pages stay charged to the cgroup that read them, so a warm
        # file would not count against this one (measured: 5.30 GiB RSS inside a 3.94 GiB group)
        with open(gguf, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        print(f"evaluating {gguf.name} again inside a {bound / GiB:.2f} GiB cgroup (the bound) ...", flush=True)
        run = run_limited(argv, bound, env={**os.environ, "MERGEQ_QUIET": "1"}, cwd=ROOT, timeout=3 * 3600)
        row = {
            "file": gguf.name,
            "gguf_gib": gguf.stat().st_size / GiB,
            "limit_gib": bound / GiB,
            "seconds": run.seconds,
            "exit": run.returncode,
            "oom_killed": run.oom_killed,
            "cgroup_max_gib": (run.max_usage_bytes or 0) / GiB,
            "run_kl": run_kl,
        }
        if run.returncode == 0:
            result = json.loads(run.stdout)[0]
            row["kl"] = result.get("kl_divergence")
            row["tool_peak_gib"] = result.get("peak_rss_bytes", {}).get("eval", 0) / GiB
            provenance = result.get("provenance", {}).get("eval", {})
            row["weights"] = provenance.get("llama_weights") or "repacked (llama.cpp's default)"
            if (anon := provenance.get("llama_perplexity_peak_anonymous_bytes")) is not None:
                row["tool_anon_gib"] = anon / GiB
        else:
            print(run.stderr[-3000:])
        print(
            f"{gguf.name} ({row['gguf_gib']:.2f} GiB) under {row['limit_gib']:.2f} GiB: exit {run.returncode}"
            f"{' (OOM-killed)' if run.oom_killed else ''}, {run.seconds:.0f} s, cgroup high-water "
            f"{row['cgroup_max_gib']:.2f} GiB; KL {row.get('kl')} (the run's: {run_kl}); {row.get('weights')}",
            flush=True,
        )
        rows.append(row)
    return rows


def only_export(args, base: Path, calib: Path, out: Path, limit: int, bound: int) -> int:
    from memory_limit import run_limited

    argv = [sys.executable, "-m", "mergeq.cli", "export", args.only, "--model", str(base), "--out", str(out)]
    argv += ["--no-eval", "--calib", str(calib), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    argv += ["--group-size", "128"]
    print(f"running mergeq export {args.only} under a {limit / GiB:.2f} GiB cgroup ...", flush=True)
    run = run_limited(argv, limit, env={**os.environ, "MERGEQ_QUIET": "1"}, cwd=ROOT, timeout=6 * 3600)
    if run.returncode != 0:
        print(run.stderr[-4000:])
        raise SystemExit(f"mergeq export failed (exit {run.returncode}, OOM-killed: {run.oom_killed})")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the export is this script's only child
    rows = stage_rows(out) or [{"step": args.only, "seconds": run.seconds, "peak_gib": peak / GiB}]
    print(
        f"mergeq export {args.only}, {args.layers} layers of Llama-3.1-8B widths, calibration {args.samples} x "
        f"{args.seq_len} tokens, no evaluation, under a {limit / GiB:.2f} GiB cgroup: {run.seconds:.0f} s, "
        f"cgroup high-water mark {(run.max_usage_bytes or 0) / GiB:.2f} GiB (page cache included)"
    )
    for row in rows:
        print(f"{row['step']:<14} {row['seconds']:>8.1f} s {row['peak_gib']:>6.2f} GiB peak RSS")
    print(bound_verdict(rows, bound, limit))
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
