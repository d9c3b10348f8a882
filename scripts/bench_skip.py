#!/usr/bin/env python
"""Benchmark: how long `mergeq run` takes to decide that a finished pipeline is up to date.

Builds a synthetic checkpoint with Llama-3.1-8B's widths (scripts/bench_scale.py's, `--layers` of its 32
layers) and a rank-16 LoRA, runs `mergeq run` once to completion (merge without validation, GGUF Q8_0 without
evaluation: the cheapest stages that write model-sized outputs), then, in the same command:
- a second `mergeq run`: every file is trusted from its stamp (size, mtime, inode), nothing is re-read;
- `mergeq run --verify`: every input and output file is read and hashed again, as before stamps;
- `sha256sum` over the same files, the peer: what re-hashing costs outside mergeq.
Both reruns must skip every stage. Each check runs `--repeat` times from a cold page cache (root empties it
first), the fastest counts. Prints the wall time of each, the bytes behind the decision and the ratios.

    .venv/bin/python scripts/bench_skip.py                 # 16 layers: 8.2 GB base, about 30 GB of disk at peak
    .venv/bin/python scripts/bench_skip.py --layers 32     # the whole 8B shape: 16 GB base, about 57 GB at peak
    # a pipeline that already finished, e.g. the one `scripts/bench_scale.py --keep` leaves (no disk needed):
    W=~/.cache/mergeq/bench-scale; .venv/bin/python scripts/bench_skip.py --config $W/run.toml --out $W/out
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

GiB = 1 << 30
MERGEQ = [sys.executable, "-m", "mergeq.cli"]


def drop_caches() -> bool:
    """Empty the page cache (root only), so that every check starts cold, as after a reboot or on a busy host."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def timed(argv: list[str], repeat: int = 1) -> tuple[float, str]:
    """The fastest of `repeat` runs, each from a cold page cache where that can be had."""
    best, stdout = float("inf"), ""
    for _ in range(repeat):
        drop_caches()
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        best, stdout = min(best, seconds), done.stdout
    return best, stdout


def files_under(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file() and ".mergeq" not in p.parts)


def main() -> int:
    from bench_scale import build_inputs

    from mergeq.core.paths import cache_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None, help="default: <cache>/bench-scale")
    parser.add_argument("--keep", action="store_true", help="keep the pipeline's outputs")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each check; the fastest counts")
    parser.add_argument("--config", type=Path, help="measure this finished pipeline (with --out) instead of making one")
    parser.add_argument("--out", type=Path, help="the finished pipeline's output directory (with --config)")
    args = parser.parse_args()
    if (args.config is None) != (args.out is None):
        parser.error("--config and --out go together")
    if args.config is not None:
        config, out = args.config, args.out
        if not (out / ".mergeq").is_dir():
            parser.error(f"{out} holds no finished mergeq run (no {out / '.mergeq'})")
        return measure(config, out, config_inputs(config), args.repeat, keep=True, first=None)
    work = args.workdir or cache_root() / "bench-scale"
    work.mkdir(parents=True, exist_ok=True)
    base, adapter, _calib, _text = build_inputs(work, args.layers, 16)
    config = work / "skip.toml"
    config.write_text(f"""[merge]
base = "{base}"
adapters = [{{ path = "{adapter}" }}]
validate = false

[eval]
enabled = false

[gguf]
quant = ["Q8_0"]
""")
    out = work / f"skip-out-l{args.layers}"
    if out.exists():  # kept from an earlier --keep run: the first run is then a skip too
        print(f"(reusing {out})", flush=True)
    print(f"first run: mergeq run {config} --out {out} (merge, GGUF Q8_0) ...", flush=True)
    first, _ = timed([*MERGEQ, "-q", "run", str(config), "--out", str(out), "--json"])
    return measure(config, out, [base, adapter], args.repeat, keep=args.keep, first=first)


def config_inputs(config: Path) -> list[Path]:
    """The files a pipeline config names as inputs: base, adapters, evaluation and calibration texts."""
    import tomllib

    data = tomllib.loads(config.read_text())
    merge = data.get("merge", {})
    found = [merge.get("base"), merge.get("qlora_base"), *(a.get("path") for a in merge.get("adapters", []))]
    found += [data.get("eval", {}).get("text")]
    found += [table.get("calib") for table in data.values() if isinstance(table, dict)]
    return [Path(p).expanduser() for p in dict.fromkeys(f for f in found if f)]


def measure(config: Path, out: Path, inputs: list[Path], repeat: int, *, keep: bool, first: float | None) -> int:
    files = files_under(*[p for p in inputs if p.is_dir()], out) + [p for p in inputs if p.is_file()]
    total = sum(p.stat().st_size for p in files)

    skip, stdout = timed([*MERGEQ, "-q", "run", str(config), "--out", str(out), "--json"], repeat)
    result = json.loads(stdout)
    assert not result["ran"] and result["skipped"], result
    verify, stdout = timed([*MERGEQ, "-q", "run", str(config), "--out", str(out), "--json", "--verify"], repeat)
    result = json.loads(stdout)
    assert not result["ran"] and result["skipped"], result
    peer, _ = timed(["sha256sum", *map(str, files)], repeat)
    cold = "cold page cache before each" if drop_caches() else "page cache as it was (not root: no drop_caches)"

    made = f"; first run {first:.1f} s" if first is not None else ""
    print(f"\n{len(files)} files, {total / GiB:.2f} GiB (inputs and outputs of {config.name}){made}")
    print(f"fastest of {repeat} runs each, {cold}; skipped: {', '.join(result['skipped'])}")
    print("| check | wall | x sha256sum of the same files |")
    print("|---|---|---|")
    print(f"| `mergeq run` again (stamps) | {skip:.2f} s | {skip / peer:.3f} |")
    print(f"| `mergeq run --verify` (re-hash) | {verify:.2f} s | {verify / peer:.3f} |")
    print(f"| sha256sum (peer) | {peer:.2f} s | 1 |")
    print(f"stamps vs --verify: {skip / verify:.3f}x the time")
    if not keep:
        import shutil

        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
