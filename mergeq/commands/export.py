"""`mergeq export gguf|awq|gptq --model DIR --out DIR [target options]`.

Only the named target's module is imported (the int4 exporters pull in torch), so `mergeq export gguf`
starts as fast as the llama.cpp tools it drives. The target's options are parsed by its own parser.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from exporters.registry import EXPORTER_MODULES, get_exporter
from mergeq.core.progress import QUIET_ENV

TARGET_HELP = {
    "gguf": "GGUF files for llama.cpp, made by the pinned llama.cpp converter and quantizer",
    "awq": "int4 AWQ (gemm) checkpoint for vLLM, by mergeq's own AWQ",
    "gptq": "int4 GPTQ checkpoint for vLLM, by mergeq's own GPTQ",
}


def target_parser(target: str) -> argparse.ArgumentParser:
    """The full option parser of `mergeq export TARGET`: the common options plus the exporter's own."""
    parser = argparse.ArgumentParser(prog=f"mergeq export {target}", description=TARGET_HELP.get(target))
    parser.add_argument("--model", type=Path, required=True, help="merged Hugging Face checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--reference", type=Path, help="fp16 checkpoint to compare against (default: --model)")
    parser.add_argument("--eval-text", help="evaluation text, required unless --no-eval: .txt; .jsonl with a \"text\" "
                                            "field or chat \"messages\"; .parquet:COLUMN; `demo` for the demo's text")
    parser.add_argument("--no-eval", action="store_true", help="skip perplexity/KL evaluation")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON on stdout")
    get_exporter(target).add_arguments(parser)
    return parser


def run(args) -> int:
    from mergeq.exporting import EvalSettings, run_export
    from mergeq.textopts import resolve_text_option

    options_ns = target_parser(args.target).parse_args(args.extra)
    if options_ns.json:
        os.environ[QUIET_ENV] = "1"
        logging.getLogger().setLevel(logging.WARNING)
    exporter_cls = get_exporter(args.target)
    options = exporter_cls.options_from_args(options_ns)
    if args.target in ("awq", "gptq") and getattr(options, "method", None) != "rtn":
        options.calib = resolve_text_option(options.calib, option="--calib", purpose="calibration")
    text = None
    if not options_ns.no_eval:
        text = resolve_text_option(options_ns.eval_text, option="--eval-text", purpose="evaluation")
    evaluation = EvalSettings(text=text, reference=options_ns.reference, enabled=not options_ns.no_eval)
    reports = run_export(args.target, options_ns.model, options_ns.out, options, evaluation)
    from exporters.report import print_reports

    print_reports(reports, as_json=options_ns.json)
    return 0


def register(sub) -> None:
    parser = sub.add_parser("export", help="export a merged checkpoint to GGUF, AWQ or GPTQ, with reports")
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name in EXPORTER_MODULES:
        # add_help=False: `mergeq export TARGET --help` reaches the target's full parser in run()
        target = targets.add_parser(name, help=TARGET_HELP.get(name), add_help=False)
        target.set_defaults(run=run, takes_extra=True)
