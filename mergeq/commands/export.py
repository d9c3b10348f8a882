"""`mergeq export gguf|awq|gptq --model DIR --out DIR [target options]`."""

from __future__ import annotations

import importlib
from pathlib import Path

from exporters.registry import EXPORTER_MODULES, get_exporter
from mergeq.exporting import EvalSettings, run_export


def run(args) -> int:
    exporter_cls = get_exporter(args.target)
    options = exporter_cls.options_from_args(args)
    evaluation = EvalSettings(text=args.eval_text, reference=args.reference, enabled=not args.no_eval)
    reports = run_export(args.target, args.model, args.out, options, evaluation)
    from exporters.report import print_reports

    print_reports(reports, as_json=args.json)
    return 0


def register(sub) -> None:
    parser = sub.add_parser("export", help="export a merged checkpoint to GGUF, AWQ or GPTQ, with reports")
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, module in EXPORTER_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            continue  # an exporter that is not installed yet is simply not offered
        cls = get_exporter(name)
        target = targets.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
        target.add_argument("--model", type=Path, required=True, help="merged Hugging Face checkpoint directory")
        target.add_argument("--out", type=Path, required=True, help="output directory")
        target.add_argument("--reference", type=Path, help="fp16 checkpoint to compare against (default: --model)")
        target.add_argument("--eval-text", type=Path, help="evaluation text file (default: the demo evaluation text)")
        target.add_argument("--no-eval", action="store_true", help="skip perplexity/KL evaluation")
        target.add_argument("--json", action="store_true", help="print the reports as JSON on stdout")
        cls.add_arguments(target)
        target.set_defaults(run=run)
