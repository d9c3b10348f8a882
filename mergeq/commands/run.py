"""`mergeq run [CONFIG.toml] [--out DIR]`: the whole pipeline; with no config, the embedded demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mergeq.executors import EXECUTORS


def run(args) -> int:
    from mergeq.matrix import load_matrix, single
    from mergeq.pipeline import demo_config
    from mergeq.runner import run_matrix

    matrix = load_matrix(args.config) if args.config else single(demo_config())
    result = run_matrix(
        matrix,
        args.out,
        executor=args.executor,
        address=args.address,
        num_cpus=args.num_cpus,
        preflight_only=args.check,
        verify=args.verify,
    )
    if args.check:
        from mergeq.budget import check_disk, format_table

        for name, budgets in result.plan.budgets.items():
            if name:
                print(f"model {name}:")
            print(format_table(budgets, matrix.out_dir(args.out, name)))
        pending = [b.stage for b in result.pending]
        check_disk(result.pending, args.out, pending, one_at_a_time=args.executor == "local")  # refuses as run would
        print(f"the output disk can hold the stages still to run ({', '.join(pending) or 'none'})")
        return 0
    from exporters.report_text import print_reports

    if args.json:
        json.dump(
            {
                "out": str(result.out),
                "ran": result.ran,
                "skipped": result.skipped,
                "reports": [r.to_json() for r in result.reports],
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        print_reports(result.reports)
    return 0


def register(sub) -> None:
    parser = sub.add_parser("run", help="merge and export everything a config asks for (no config: the demo)")
    parser.add_argument("config", nargs="?", type=Path, help="pipeline TOML file (omit for the embedded demo)")
    parser.add_argument("--out", type=Path, default=Path("mergeq-out"), help="output directory (default: ./mergeq-out)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config, preflight every export, print each stage's predicted peak memory "
        "and disk, then stop (exit 2 when the output disk cannot hold the stages still to run)",
    )
    parser.add_argument("--json", action="store_true", help="print the run's reports as JSON on stdout")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-read every input and output to decide what is up to date (default: trust files "
        "whose size, times and inode are unchanged since the last run)",
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local: every stage in this process, one after another (default); ray: each stage a "
        "Ray task (see --address); --out must then be a path every node sees",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="with --executor ray: the running Ray cluster to use (HOST:PORT of its head, or auto); "
        "without it a local cluster is started for the run",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        metavar="N",
        help="with --executor ray and no --address: CPUs of the local cluster (default: all)",
    )
    parser.set_defaults(run=run)
