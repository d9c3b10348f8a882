"""The export matrix on this machine: the local executor (one stage after another) against Ray (a local cluster).

    .venv/bin/python scripts/bench_matrix.py [--threads 1] [--num-cpus 2] [--exports gguf,awq] [--eval] [--work DIR]

The demo matrix: three demo-sized adapters over the demo base (the demo's QLoRA adapter, and two of its twins
with the LoRA B matrices scaled by 0.5 and 1.5: same shapes and training evidence, other weights), each merged
(into the rebuilt NF4 base, as the demo does; validation off) and exported (default: GGUF Q8_0 and AWQ group 64
on the demo's calibration text; evaluation only with --eval). Both runs are `mergeq run` processes on fresh
output directories, with the same torch thread count (each stage's key records it, and each Ray task asks for
that many CPUs): `--executor local`, then `--executor ray --num-cpus N`, which starts a local cluster and runs
up to N / threads stages at once. Prints each wall time and CPU time (children included), the Ray/local ratio,
and whether every artifact is byte-identical between the two runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALES = (1.0, 0.5, 1.5)  # LoRA B scale of each row's adapter
DOC_FILES = {"report.json", "report.md", "README.md"}


def make_adapters(work: Path) -> list[Path]:
    """The demo adapter and its scaled twins (every other file of the folder kept as it is)."""
    from safetensors.torch import load_file, save_file

    from mergeq.demo import demo_assets

    source = demo_assets().adapter
    adapters = []
    for number, scale in enumerate(SCALES, 1):
        folder = work / f"adapter{number}"
        if not folder.exists():
            shutil.copytree(source, folder)
            if scale != 1.0:
                weights = load_file(folder / "adapter_model.safetensors")
                save_file(
                    {k: (v * scale).to(v.dtype) if "lora_B" in k else v for k, v in weights.items()},
                    folder / "adapter_model.safetensors",
                )
        adapters.append(folder)
    return adapters


def write_config(work: Path, adapters: list[Path], exports: list[str], evaluate: bool) -> Path:
    from mergeq.demo import demo_assets

    assets = demo_assets()
    rows = "\n".join(f'[[model]]\nname = "demo{n}"\nadapters = [{{path = "{a}"}}]\n' for n, a in enumerate(adapters, 1))
    sections = {
        "gguf": '[gguf]\nquant = ["Q8_0"]\n',
        "awq": f'[awq]\ngroup_size = 64\ncalib = "{assets.calib_text}"\n',
        "gptq": f'[gptq]\ngroup_size = 64\ncalib = "{assets.calib_text}"\n',
    }
    evaluation = f'text = "{assets.eval_text}"' if evaluate else "enabled = false"
    config = work / "matrix.toml"
    config.write_text(
        f'[merge]\nbase = "{assets.base}"\nvalidate = false\n\n{rows}\n[eval]\n{evaluation}\n\n'
        + "\n".join(sections[e] for e in exports)
    )
    return config


def timed_run(config: Path, out: Path, threads: int, *more: str) -> tuple[float, float]:
    """Wall seconds of one `mergeq run`, and the CPU seconds of its whole process tree: Ray's raylet starts the
    workers that run the stages and nobody waits for them, so rusage of children would miss them; the tree is
    sampled from /proc twice a second instead (each process's last reading counts: under half a second of a
    process that exits between two samples is lost, in both runs alike)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergeq.cli", "-q", "run", str(config), "--out", str(out), *more],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: dict[tuple[int, int], float] = {}  # (pid, start tick) -> CPU seconds
    while proc.poll() is None:
        seen.update(_tree_cpu(proc.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - started
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        sys.exit(f"mergeq run {' '.join(more)} failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    return wall, sum(seen.values())


def _tree_cpu(root: int) -> dict[tuple[int, int], float]:
    """user + system CPU seconds of `root` and every process below it, keyed by (pid, start time)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats, children = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            fields = stats[pid]  # after the name: state ppid ... utime(12) stime(13) ... starttime(20)
            found[(pid, int(fields[19]))] = (int(fields[11]) + int(fields[12])) / tick
        todo += children.get(pid, [])
    return found


def artifacts(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file()
        and ".mergeq" not in p.relative_to(out).parts
        and p.name not in DOC_FILES
        and not p.name.startswith("summary.")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every stage, both runs (default 1)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    parser.add_argument("--exports", default="gguf,awq", help="comma-separated: gguf, awq, gptq (default gguf,awq)")
    parser.add_argument("--eval", action="store_true", help="evaluate every artifact (default: off)")
    parser.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed after)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        config = write_config(work, make_adapters(work), args.exports.split(","), args.eval)
        local = timed_run(config, work / "local", args.threads, "--executor", "local")
        ray = timed_run(config, work / "ray", args.threads, "--executor", "ray", "--num-cpus", str(args.num_cpus))
        same = artifacts(work / "local") == artifacts(work / "ray")
        print(
            f"demo matrix: {len(SCALES)} adapters x ({args.exports}), evaluation {'on' if args.eval else 'off'}, "
            f"{args.threads} torch thread(s) per stage, {os.cpu_count()} cores"
        )
        print(f"{'executor':<28} {'wall s':>8} {'CPU s':>8}  (CPU: the run's whole process tree)")
        print(f"{'local (sequential)':<28} {local[0]:>8.1f} {local[1]:>8.1f}")
        print(f"{f'ray (local cluster, {args.num_cpus} CPUs)':<28} {ray[0]:>8.1f} {ray[1]:>8.1f}")
        print(f"{'ratio ray / local':<28} {ray[0] / local[0]:>8.2f} {ray[1] / max(local[1], 1e-9):>8.2f}")
        print(f"artifacts byte-identical between the two runs: {'yes' if same else 'NO'}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
