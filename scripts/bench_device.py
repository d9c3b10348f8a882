"""int4 export on a CUDA device against the CPU, in one command: wall time, peak memory, and how far apart the
two outputs are.

Writes a synthetic Llama-shaped fp16 checkpoint (tests/synthetic.py) with a real tokenizer copied beside it, then
runs `mergeq export gptq` and `mergeq export awq` once with `--device cuda` and once with `--device cpu` on the
same calibration text, and compares the packed integer codes of the two outputs. Needs a CUDA device; made for
the lent GPU machine, where it runs from a copy of the repo:

    python3 scripts/bench_device.py --tokenizer DIR_WITH_TOKENIZER --calib calib.txt --json out.json

Prints one table row per (method, device) and the cuda/cpu wall ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def run_export(
    method: str, device: str, model: Path, out: Path, calib: Path, samples: int, seq_len: int, reuse: bool = False
) -> dict:
    """One `mergeq export` in a child process: wall seconds and the largest child peak RSS so far."""
    if reuse and (out / "config.json").is_file():
        return {"method": method, "device": device, "reused": str(out)}
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    argv = [
        sys.executable,
        "-m",
        "mergeq.cli",
        "export",
        method,
        "--model",
        str(model),
        "--out",
        str(out),
        "--calib",
        str(calib),
        "--samples",
        str(samples),
        "--seq-len",
        str(seq_len),
        "--device",
        device,
        "--group-size",
        "128",
        "--no-eval",
        "--json",
    ]
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{method} on {device} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
    return {
        "method": method,
        "device": device,
        "wall_s": round(wall, 1),
        "max_child_rss_gib": round(peak_kib / 2**20, 2),
    }


def compare_codes(a: Path, b: Path) -> dict:
    """Share of equal int32 words in every packed integer tensor (qweight/qzeros), and the largest relative
    difference of the scales."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        found = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, "pt") as handle:
                for name in handle.keys():
                    found[name] = shard
        return found

    left, right = tensors(a), tensors(b)
    equal = total = 0
    worst_scale = 0.0
    for name in sorted(left):
        with safe_open(left[name], "pt") as x, safe_open(right[name], "pt") as y:
            p, q = x.get_tensor(name), y.get_tensor(name)
        if p.dtype == torch.int32:
            equal += int((p == q).sum())
            total += p.numel()
        elif name.endswith("scales"):
            rel = ((p.float() - q.float()).abs() / q.float().abs().clamp_min(1e-8)).max()
            worst_scale = max(worst_scale, float(rel))
    return {"equal_int32_words": equal / max(1, total), "max_rel_scale_diff": worst_scale}


def run_eval(artifact: Path, reference: Path, text: Path, device: str, cache: Path, windows: int) -> dict:
    """mergeq's streamed evaluation of `artifact` against `reference` on `device` (reference pass included:
    each device gets its own empty reference cache)."""
    from exporters.eval_options import EvalOptions
    from exporters.evaluate import evaluate_full

    if cache.exists():
        shutil.rmtree(cache)
    started = time.perf_counter()
    result = evaluate_full(artifact, reference, text, EvalOptions(device=device, cache_dir=cache, max_windows=windows))
    quality = result.quality if hasattr(result, "quality") else result
    info = quality.to_json() if hasattr(quality, "to_json") else getattr(quality, "__dict__", {})
    return {
        "eval": artifact.name,
        "device": device,
        "wall_s": round(time.perf_counter() - started, 1),
        **{
            k: info[k]
            for k in ("perplexity", "reference_perplexity", "kl_divergence", "top1_agreement", "eval_tokens")
            if k in info
        },
    }


def main() -> int:
    import torch

    sys.path.insert(0, str(REPO / "tests"))  # synthetic.py: shared with the tests
    from synthetic import LlamaShape, write_llama

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="folder with tokenizer.json (its vocab sets the model's)"
    )
    parser.add_argument("--calib", type=Path, required=True, help="calibration text")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergeq-bench-device"))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", default="gptq,awq")
    parser.add_argument("--devices", default="cuda,cpu")
    parser.add_argument("--eval-text", type=Path, help="also evaluate the first method's output on each device")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--reuse", action="store_true", help="keep exports already in --work")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    vocab = len(json.loads((args.tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    shape = LlamaShape(
        hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=16, kv_heads=4, vocab=vocab
    )
    model = args.work / "model"
    started = time.perf_counter()
    if not (model / "config.json").is_file():
        write_llama(model, shape, dtype=torch.float16)
        for name in TOKENIZER_FILES:
            if (args.tokenizer / name).is_file():
                shutil.copy(args.tokenizer / name, model / name)
    print(
        f"synthetic Llama {shape.params() / 1e9:.2f}B params ({shape.layers} layers, hidden {shape.hidden}, "
        f"vocab {vocab}) in {time.perf_counter() - started:.1f} s; torch {torch.__version__}, "
        f"cuda {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )

    rows = []
    for method in args.methods.split(","):
        outs = {}
        for device in args.devices.split(","):
            out = args.work / f"{method}-{device}"
            row = run_export(method, device, model, out, args.calib, args.samples, args.seq_len, args.reuse)
            outs[device] = out
            rows.append(row)
            print(json.dumps(row), flush=True)
        if len(outs) == 2 and not args.reuse:
            first, second = outs.values()
            rows.append({"method": method, "compare": f"{first.name} vs {second.name}", **compare_codes(first, second)})
            print(json.dumps(rows[-1]), flush=True)

    if args.eval_text:
        first = args.methods.split(",")[0]
        for device in args.devices.split(","):
            row = run_eval(
                args.work / f"{first}-{args.devices.split(',')[0]}",
                model,
                args.eval_text,
                device,
                args.work / f"eval-cache-{device}",
                args.eval_windows,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{'method':<6} {'device':<6} {'wall s':>8}")
    for row in rows:
        if "wall_s" in row:
            print(f"{row.get('method', 'eval'):<6} {row['device']:<6} {row['wall_s']:>8.1f}")
    for method in args.methods.split(","):
        walls = {r["device"]: r["wall_s"] for r in rows if r.get("method") == method and "wall_s" in r}
        if method == args.methods.split(",")[0] and args.eval_text:
            evals = {r["device"]: r["wall_s"] for r in rows if "eval" in r}
            if "cuda" in evals and "cpu" in evals:
                print(f"evaluation: cuda/cpu wall ratio {evals['cuda'] / evals['cpu']:.3f}")
        if "cuda" in walls and "cpu" in walls:
            print(f"{method}: cuda/cpu wall ratio {walls['cuda'] / walls['cpu']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape.__dict__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
