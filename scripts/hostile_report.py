"""Run the whole hostile corpus and fault set through the `mergeq` CLI and print one table (markdown, for the README).

    .venv/bin/python scripts/hostile_report.py [--corpus DIR] [--no-kills]

Columns: cases tried, clear errors (nonzero exit, message naming the file/tensor/key, no traceback), cases that
left files behind, cases that lost data (a previous artifact or an input changed). The last two must be 0; kill
trials count as clear when the killed run resumed to byte-identical artifacts. Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HOSTILE = Path(__file__).resolve().parent.parent / "tests" / "hostile"
sys.path.insert(0, str(HOSTILE))

import fault_cases  # noqa: E402
import make_corpus  # noqa: E402
from harness import run_case  # noqa: E402

GROUPS = ("safetensors", "adapter", "base", "export", "config", "fault", "kill -9")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, help="where to build the corpus (default: a temporary directory)")
    parser.add_argument("--no-kills", action="store_true", help="skip the kill -9 trials (the slow part)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mergeq-hostile-") as tmp:
        root = args.corpus or Path(tmp)
        rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # tried, clear, left behind, lost
        failures: list[str] = []

        def count(group: str, clear: bool, left: bool, lost: bool, detail: str) -> None:
            row = rows[group]
            row[0] += 1
            row[1] += int(clear)
            row[2] += int(left)
            row[3] += int(lost)
            if not clear or left or lost:
                failures.append(detail)

        cases = make_corpus.build(root)
        for case in cases:
            outcome = run_case(case, root)
            count(
                case.group,
                outcome.clear,
                bool(outcome.leftovers),
                bool(outcome.lost),
                outcome.explain().split("\n--- output")[0],
            )
        ref = fault_cases.reference_run(root)
        for outcome in fault_cases.all_faults(root, ref):
            count(
                "fault",
                outcome.clear and not outcome.problems,
                bool(outcome.leftovers),
                bool(outcome.lost),
                outcome.explain().split("\n--- output")[0],
            )
        kills = [] if args.no_kills else fault_cases.kill_and_resume(root, ref)
        for trial in kills:
            count(
                "kill -9",
                trial.ok,
                bool(trial.leftovers),
                trial.killed and trial.rerun_code == 0 and not trial.identical,
                f"{trial.label()}: {trial.detail}",
            )

    lines = ["| inputs | cases tried | clear errors | left files behind | lost data |", "|---|---:|---:|---:|---:|"]
    total = [0, 0, 0, 0]
    for group in GROUPS:
        if group not in rows:
            continue
        row = rows[group]
        total = [a + b for a, b in zip(total, row)]
        label = {"fault": "faults (ENOSPC, tool crash, two runs)", "kill -9": "kill -9 + rerun (byte-identical)"}.get(
            group, group
        )
        lines.append(f"| {label} | {row[0]} | {row[1]} | {row[2]} | {row[3]} |")
    lines.append(f"| **total** | **{total[0]}** | **{total[1]}** | **{total[2]}** | **{total[3]}** |")
    print("\n".join(lines))
    if kills:
        stages = defaultdict(int)
        for trial in kills:
            stages[trial.stage] += int(trial.killed)
        print(
            f"\nkill -9 trials per stage: {', '.join(f'{s} {n}' for s, n in stages.items())} "
            f"(seed {fault_cases.KILL_SEED}); {time.monotonic() - started:.0f} s in all"
        )
    if failures:
        print("\nfailed:\n" + "\n".join(f"- {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
