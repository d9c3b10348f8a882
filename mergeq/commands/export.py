"""`mergeq export gguf|awq|gptq --model DIR --out DIR [target options]`.

Only the named target's module is imported (the int4 exporters pull in torch), so `mergeq export gguf`
starts as fast as the llama.cpp tools it drives. The target's options are parsed by its own parser.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from exporters.eval_options import EvalOptions
from exporters.registry import EXPORTER_MODULES, get_exporter
from mergeq.core.options import add_options, from_namespace
from mergeq.core.progress import QUIET_ENV

TARGET_HELP = {
    "gguf": "GGUF files for llama.cpp, made by the pinned llama.cpp converter and quantizer",
    "awq": "int4 AWQ (gemm) checkpoint for vLLM, by mergeq's own AWQ",
    "gptq": "int4 GPTQ checkpoint for vLLM, by mergeq's own GPTQ",
}


EVAL_FLAGS = ("text", "enabled", "reference")  # of EvalOptions, offered by `mergeq export`


def target_parser(target: str) -> argparse.ArgumentParser:
    """The full option parser of `mergeq export TARGET`: the common options plus the exporter's own."""
    parser = argparse.ArgumentParser(prog=f"mergeq export {target}", description=TARGET_HELP.get(target))
    parser.add_argument("--model", type=Path, required=True, help="merged Hugging Face checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    add_options(parser, EvalOptions, only=EVAL_FLAGS)
    parser.add_argument("--json", action="store_true", help="print the reports as JSON on stdout")
    add_options(parser, get_exporter(target).options)
    return parser


def run(args) -> int:
    from mergeq.exporting import run_export
    from mergeq.textopts import resolve_texts

    options_ns = target_parser(args.target).parse_args(args.extra)
    if options_ns.json:
        os.environ[QUIET_ENV] = "1"
        logging.getLogger().setLevel(logging.WARNING)
    options = resolve_texts(from_namespace(get_exporter(args.target).options, options_ns))
    evaluation = from_namespace(EvalOptions, options_ns, only=EVAL_FLAGS)
    evaluation = resolve_texts(evaluation) if evaluation.enabled else evaluation
    reports = run_export(args.target, options_ns.model, options_ns.out, options, evaluation)
    from exporters.report_text import print_reports

    print_reports(reports, as_json=options_ns.json)
    return 0


def register(sub) -> None:
    parser = sub.add_parser("export", help="export a merged checkpoint to GGUF, AWQ or GPTQ, with reports")
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name in EXPORTER_MODULES:
        # add_help=False: `mergeq export TARGET --help` reaches the target's full parser in run()
        target = targets.add_parser(name, help=TARGET_HELP.get(name), add_help=False)
        target.set_defaults(run=run, takes_extra=True)
