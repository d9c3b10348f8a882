"""Time mergeq's evaluator on the demo base against the 60 s budget, and its GGUF path against llama.cpp alone.

    .venv/bin/python scripts/bench_eval.py [--text FILE] [--windows 16]

In one run, each in a fresh process (so peak RSS is its own):
  1. the reference pass: the fp16 demo base through torch, cached for the run (cold cache);
  2. an HF artifact against the cached reference (the demo base itself, evaluated as an artifact);
  3. the f16 GGUF of the demo base through mergeq (llama-perplexity + mergeq's metrics);
  4. the peer: the same llama-perplexity command by hand, with nothing else.
It prints wall seconds, peak RSS, the ratio of 3 to 4, and the cross-check numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, time, resource
from pathlib import Path
from exporters.eval_options import EvalOptions
from exporters.evaluate import evaluate_full
artifact, reference, text, cache, windows = sys.argv[1:6]
started = time.perf_counter()
r = evaluate_full(Path(artifact), Path(reference), Path(text),
                  EvalOptions(max_windows=int(windows), cache_dir=Path(cache)))
q = r.quality
print(json.dumps({"seconds": time.perf_counter() - started, "perplexity": q.perplexity,
                  "reference_perplexity": q.reference_perplexity, "kl": q.kl_divergence, "top1": q.top1_agreement,
                  "tokens": q.eval_tokens, "warnings": r.warnings}))
"""


def child_rss() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


CPU: list[float] = []  # CPU seconds (user + system) of each run, children included


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(argv: list[str]) -> tuple[float, str]:
    cpu = children_cpu()
    started = time.perf_counter()
    env = {**os.environ, "MERGEQ_QUIET": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    CPU.append(children_cpu() - cpu)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def evaluate(artifact: Path, reference: Path, text: Path, cache: Path, windows: int) -> tuple[float, dict]:
    seconds, out = run(
        [sys.executable, "-c", CHILD, str(artifact), str(reference), str(text), str(cache), str(windows)]
    )
    return seconds, json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, help="evaluation text (default: the demo evaluation text)")
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()

    from exporters.llamacpp.build import tool_path
    from exporters.llamacpp.convert import converter_command
    from exporters.llamacpp.run import run_tool
    from mergeq.demo import demo_base
    from mergeq.demo_texts import build_texts

    base = demo_base()
    perplexity_tool = tool_path("llama-perplexity")
    with tempfile.TemporaryDirectory(prefix="mergeq-bench-eval-") as tmp:
        tmp = Path(tmp)
        text = args.text or tmp / "eval.txt"
        if args.text is None:
            text.write_text(build_texts().eval, encoding="utf-8")
        gguf = tmp / "base-f16.gguf"
        run_tool(converter_command(base, gguf, "f16"))
        cache = tmp / "cache"
        rows = []
        # 1. cold: the reference pass is part of this one (the artifact is the reference itself)
        seconds, ref = evaluate(base, base, text, cache, args.windows)
        rows.append(("reference pass (cold cache), HF fp16", seconds, child_rss(), ref))
        # 2. HF artifact, reference cached: a copy of the base, so it is loaded and run like any artifact
        copy = tmp / "hf-copy"
        copy.mkdir()
        for item in base.iterdir():
            (copy / item.name).symlink_to(item)
        seconds, hf = evaluate(copy, base, text, cache, args.windows)
        rows.append(("HF artifact (reference cached)", seconds, child_rss(), hf))
        # 3. GGUF artifact through mergeq
        seconds, gg = evaluate(gguf, base, text, cache, args.windows)
        rows.append(("GGUF f16 through mergeq (reference cached)", seconds, child_rss(), gg))
        # 4. the peer: llama-perplexity alone, same settings
        peer_seconds, _ = run(
            [
                str(perplexity_tool),
                "-m",
                str(gguf),
                "-f",
                str(text),
                "-c",
                "512",
                "-b",
                "2048",
                "--chunks",
                str(args.windows),
                "-t",
                str(os.cpu_count() or 1),
            ]
        )
        rows.append(("peer: llama-perplexity alone", peer_seconds, child_rss(), None))

    cpus = CPU[-4:]
    print(f"\n{'run':46s} {'seconds':>8s} {'CPU s':>7s} {'max RSS so far (MiB)':>21s}  perplexity")
    for (name, seconds, rss, result), cpu in zip(rows, cpus):
        ppl = f"{result['perplexity']:.4f}" if result else ""
        print(f"{name:46s} {seconds:8.1f} {cpu:7.1f} {rss / 2**20:21.0f}  {ppl}")
    print(f"(load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(
        f"\nscored tokens: {hf['tokens']}; budget: one artifact <= 60 s -> HF {rows[1][1]:.1f} s, "
        f"GGUF {rows[2][1]:.1f} s"
    )
    print(f"GGUF through mergeq / llama-perplexity alone: {rows[2][1] / peer_seconds:.2f}")
    print(
        f"cross-check: GGUF f16 ppl {gg['perplexity']:.4f} vs HF fp16 {hf['perplexity']:.4f} "
        f"(ratio {gg['perplexity'] / hf['perplexity']:.5f}), KL {gg['kl']:.2e}, top-1 {gg['top1']:.4f}"
    )
    if gg["warnings"]:
        print("GGUF warnings:", *gg["warnings"], sep="\n  ")


if __name__ == "__main__":
    main()
