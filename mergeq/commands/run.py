"""`mergeq run [CONFIG.toml] [--out DIR]`: the whole pipeline; with no config, the embedded demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mergeq.config import load_config


def run(args) -> int:
    from mergeq.pipeline import demo_config, run_pipeline

    config = load_config(args.config) if args.config else demo_config()
    result = run_pipeline(config, args.out, preflight_only=args.check, verify=args.verify)
    if args.check:
        from mergeq.budget import format_table

        print(format_table(result.budgets, args.out))
        return 0
    from exporters.report import print_reports

    if args.json:
        json.dump({"out": str(result.out), "ran": result.ran, "skipped": result.skipped,
                   "reports": [r.to_json() for r in result.reports]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_reports(result.reports)
    return 0


def register(sub) -> None:
    parser = sub.add_parser("run", help="merge and export everything a config asks for (no config: the demo)")
    parser.add_argument("config", nargs="?", type=Path, help="pipeline TOML file (omit for the embedded demo)")
    parser.add_argument("--out", type=Path, default=Path("mergeq-out"), help="output directory (default: ./mergeq-out)")
    parser.add_argument("--check", action="store_true", help="validate the config, preflight every export, print each stage's "
                                                                "predicted peak memory and disk, then stop")
    parser.add_argument("--json", action="store_true", help="print the run's reports as JSON on stdout")
    parser.add_argument("--verify", action="store_true",
                        help="re-read every input and output to decide what is up to date (default: trust files "
                             "whose size, times and inode are unchanged since the last run)")
    parser.set_defaults(run=run)
