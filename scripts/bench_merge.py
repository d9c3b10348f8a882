#!/usr/bin/env python
"""Benchmark: mergeq's streaming merge against PEFT (from_pretrained + merge_and_unload + save_pretrained).

Writes a synthetic Llama-shaped fp16 model (sharded safetensors; default about 1.54B parameters) and a
rank-64 LoRA on every linear layer, then runs each tool in its own process and prints wall time, peak RSS
and the ratios against the targets (mergeq RSS <= 0.2x PEFT's and <= 1 GiB + largest tensor; wall <= 0.5x).
mergeq runs with its defaults, validation included (streamed layer by layer against PEFT's unmerged adapter);
`--no-validate` measures the merge alone. The base carries a tokenizer, as real checkpoints do (the demo base's,
cut to the vocabulary): the validation tokenizes its prompts with it, and PEFT's job saves it beside the merged
weights, as mergeq's output has it.

    .venv/bin/python scripts/bench_merge.py                                # default size, in ~/.cache/mergeq/bench
    .venv/bin/python scripts/bench_merge.py --layers 22 --heads 32         # TinyLlama's 1.1B shape
    .venv/bin/python scripts/bench_merge.py --layers 4                     # quick run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # synthetic.py: the synthetic checkpoints the tests use too

MERGEQ_JOB = """
import json, resource, sys
from mergeq.cli import main
code = main(["-q", "merge", "--base", sys.argv[1], "--adapter", sys.argv[2], "--out", sys.argv[3], "--dtype", "float16",
             *sys.argv[4:]])
from mergeq.core.memory import peak_rss_bytes  # VmHWM: ru_maxrss would include this script's parent's mark
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"code": code, "peak_kib": peak_rss_bytes() // 1024, "cpu_s": r.ru_utime + r.ru_stime}))
"""

PEFT_JOB = """
import json, resource, sys, warnings
warnings.filterwarnings("ignore")
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
if len(sys.argv) > 4:  # a shippable checkpoint carries its tokenizer, as mergeq's output does
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[3])
from mergeq.core.memory import peak_rss_bytes
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"code": 0, "peak_kib": peak_rss_bytes() // 1024, "cpu_s": r.ru_utime + r.ru_stime}))
"""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def run_job(
    name: str, code: str, base: Path, adapter: Path, out: Path, extra: tuple[str, ...] = (), env: dict | None = None
) -> dict:
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(base), str(adapter), str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "MERGEQ_QUIET": "1", **(env or {})},
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tool": name, "wall_s": wall, "cpu_s": result["cpu_s"], "peak_gib": result["peak_kib"] / 2**20}


def compare_outputs(ours: Path, peft: Path, names: list[str]) -> float:
    """Largest |difference| between the two merged checkpoints on a few tensors (sanity: same merge)."""
    import torch

    from mergeq.core.checkpoint import Checkpoint

    a, b = Checkpoint(ours), Checkpoint(peft)
    worst = 0.0
    for name in names:
        worst = max(worst, float((a.get(name, torch.float32) - b.get(name, torch.float32)).abs().max()))
    return worst


def main() -> int:
    import torch
    from synthetic import LlamaShape, write_llama, write_lora, write_tokenizer

    from mergeq.core.paths import cache_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = LlamaShape()
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--intermediate", type=int, default=defaults.intermediate)
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--kv-heads", type=int, default=defaults.kv_heads)
    parser.add_argument("--vocab", type=int, default=defaults.vocab)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=int, default=128)
    parser.add_argument("--shard-gib", type=float, default=1.0, help="input shard size")
    parser.add_argument("--workdir", type=Path, default=None, help="default: <cache>/bench")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each tool (interleaved); the fastest counts")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-validate", action="store_true", help="run mergeq with --no-validate (the merge alone)")
    parser.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="a base without tokenizer files, as before 2026-12-01: the validation then runs 96 random token ids "
        "instead of the 49 its prompts tokenize to, and neither tool copies a tokenizer",
    )
    args = parser.parse_args()

    shape = LlamaShape(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab)
    work = args.workdir or cache_root() / "bench"
    tag = f"llama-h{shape.hidden}-i{shape.intermediate}-l{shape.layers}-v{shape.vocab}"
    base = work / tag
    adapter = work / f"{tag}-lora-r{args.rank}"
    marker = base / "synthetic.json"
    if not marker.is_file() or json.loads(marker.read_text()) != {**shape.__dict__}:
        if base.exists():
            shutil.rmtree(base)
        print(f"writing synthetic base {base} ({shape.params() / 1e9:.2f}B parameters, fp16) ...", flush=True)
        write_llama(base, shape, dtype=torch.float16, max_shard_bytes=int(args.shard_gib * 2**30))
    if (
        not (adapter / "adapter_config.json").is_file()
        or json.loads((adapter / "adapter_config.json").read_text())["r"] != args.rank
    ):
        print(f"writing rank-{args.rank} LoRA on all linear layers {adapter} ...", flush=True)
        write_lora(adapter, shape, base, r=args.rank, alpha=args.alpha)
    if args.no_tokenizer:
        for name in TOKENIZER_FILES:
            (base / name).unlink(missing_ok=True)
    elif not all((base / name).is_file() for name in TOKENIZER_FILES):
        from mergeq.demo import demo_base

        print("writing the demo base's tokenizer, cut to the vocabulary, into the base ...", flush=True)
        write_tokenizer(base, shape.vocab, demo_base())

    largest = max(shape.hidden * shape.vocab, shape.hidden * shape.intermediate) * 2
    # mergeq keeps its inputs' digests between merges (<cache>/stamps/inputs.json): "mergeq" is the first
    # merge of this base (its cache emptied: every input read and hashed), "mergeq-kept" the next merge of the
    # same base (another adapter, say), which trusts the base's digests while its files are unchanged
    digests = work / "mergeq-cache"
    jobs = (("mergeq", MERGEQ_JOB), ("peft", PEFT_JOB), ("mergeq-kept", MERGEQ_JOB))
    runs: dict[str, list[dict]] = {name: [] for name, _ in jobs}
    for attempt in range(args.repeat):  # interleaved, so all see the same machine; the best run of each counts
        for name, code in jobs:
            print(f"running {name} ({attempt + 1}/{args.repeat}) ...", flush=True)
            if name == "peft":
                extra, env = (() if args.no_tokenizer else ("tokenizer",)), None
            else:
                extra, env = ("--no-validate",) if args.no_validate else (), {"MERGEQ_CACHE": str(digests)}
            if name == "mergeq":
                shutil.rmtree(digests, ignore_errors=True)
            out = work / f"out-{name}"
            runs[name].append(run_job(name, code, base, adapter, out, extra, env))
    results = [min(rows, key=lambda r: r["wall_s"]) for rows in runs.values()]
    ours, peft, kept = results
    check = [
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{shape.layers - 1}.mlp.down_proj.weight",
        "lm_head.weight",
    ]
    diff = compare_outputs(work / "out-mergeq", work / "out-peft", check)
    validation = json.loads((work / "out-mergeq" / "merge_manifest.json").read_text()).get("validation") or {}

    rss_ratio = ours["peak_gib"] / peft["peak_gib"]
    wall_ratio = ours["wall_s"] / peft["wall_s"]
    bound = 1.0 + largest / 2**30
    print()
    print(f"mergeq: {'--no-validate' if args.no_validate else 'default settings (validation on)'}")
    if validation:
        print(f"validation: {validation['positions']} positions ({validation['prompt_source']})")
    print(
        f"model: synthetic Llama {shape.params() / 1e9:.2f}B params fp16 ({shape.layers} layers, hidden "
        f"{shape.hidden}, intermediate {shape.intermediate}, vocab {shape.vocab}); LoRA r={args.rank} on all "
        f"linear layers; largest tensor {largest / 2**20:.0f} MiB"
    )
    print(f"{'tool':<12} {'wall s':>9} {'CPU s':>9} {'peak RSS GiB':>13}")
    for row in results:
        print(f"{row['tool']:<12} {row['wall_s']:>9.1f} {row['cpu_s']:>9.1f} {row['peak_gib']:>13.2f}")
    print("(mergeq: the first merge of this base, every input hashed; mergeq-kept: the base merged again, its digests")
    print(" kept from the first; peft: from_pretrained + merge_and_unload + save_pretrained)")
    cpu_ratio = ours["cpu_s"] / peft["cpu_s"]
    for label, row in (("mergeq", ours), ("mergeq-kept", kept)):
        wall, cpu, rss = (row[k] / peft[k] for k in ("wall_s", "cpu_s", "peak_gib"))
        print(
            f"ratio {label}/peft: wall {wall:.2f} (target <= 0.5: {'ok' if wall <= 0.5 else 'MISSED'}), CPU {cpu:.2f}, "
            f"peak RSS {rss:.2f} (target <= 0.2: {'ok' if rss <= 0.2 else 'MISSED'})"
        )
    print(
        f"load average during the run: {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())} "
        f"on {__import__('os').cpu_count()} cores (wall times on a shared machine vary)"
    )
    print(
        f"mergeq peak RSS {ours['peak_gib']:.2f} GiB vs 1 GiB + largest tensor = {bound:.2f} GiB: "
        f"{'ok' if ours['peak_gib'] <= bound else 'MISSED'}"
    )
    print(f"max |mergeq - peft| on {len(check)} checked tensors: {diff:.3g} (both fp16)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "shape": shape.__dict__,
                    "results": results,
                    "runs": runs,
                    "wall_ratio": wall_ratio,
                    "wall_ratio_kept": kept["wall_s"] / peft["wall_s"],
                    "cpu_ratio": cpu_ratio,
                    "rss_ratio": rss_ratio,
                    "bound_gib": bound,
                    "max_abs_diff": diff,
                },
                indent=2,
            )
            + "\n"
        )
    if not args.keep:
        for row in results:
            shutil.rmtree(work / f"out-{row['tool']}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
