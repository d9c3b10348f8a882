"""`mergeq eval --model PATH [--reference PATH] [--text FILE] [--json]`: one artifact's quality report."""

from __future__ import annotations

import logging
from pathlib import Path

from exporters.eval_options import EvalOptions
from mergeq.core.options import add_options, from_namespace

log = logging.getLogger(__name__)


EVAL_FLAGS = ("text", "reference", "n_ctx", "max_windows", "device")  # of EvalOptions
RENAMED = {"text": "--text"}


def run(args) -> int:
    from exporters.eval_inputs import detect_format
    from exporters.evaluate import evaluate_into_report
    from exporters.report_text import print_reports
    from mergeq.core.errors import MergeqError
    from mergeq.textopts import resolve_texts

    model = Path(args.model)
    kind = detect_format(model)
    options = from_namespace(EvalOptions, args, only=EVAL_FLAGS)
    reference = options.reference
    if reference is None:
        if kind != "hf":
            raise MergeqError(
                f"{model} is a quantized artifact: say what to compare it with",
                hint="pass --reference DIR, the fp16 checkpoint it was exported from",
            )
        reference = model
    report = artifact_report(model, Path(reference), kind)
    options = resolve_texts(options, flags=RENAMED)
    evaluate_into_report(report, reference=Path(reference), text=options.text, settings=options)
    if args.write_report:
        where = model if model.is_dir() else model.parent
        log.info("wrote %s", report.write(where))
    print_reports([report], as_json=args.json)
    return 0


def artifact_report(model: Path, reference: Path, kind: str):
    """The artifact's own report.json if mergeq wrote one beside it (quality cleared), else a size-only report."""
    from exporters.eval_inputs import artifact_size
    from exporters.report import ArtifactReport, load_report

    beside = (model if model.is_dir() else model.parent) / "report.json"
    if beside.is_file():
        report = load_report(beside)
        if Path(report.path).name == model.name:
            report.quality = None
            report.stages.pop("eval", None)
            report.path = str(model)
            return report
    fmt = {"gguf": "gguf", "hf": "hf"}.get(kind) or _int4_format(model)
    size, quant = artifact_size(model, reference)
    return ArtifactReport(format=fmt, quant=quant, path=str(model), size=size)


def _int4_format(model: Path) -> str:
    from mergeq.core.modelfiles import read_model_config

    return str(read_model_config(model)["quantization_config"]["quant_method"])


def register(sub) -> None:
    parser = sub.add_parser("eval", help="perplexity, KL divergence and top-1 agreement of one artifact")
    parser.add_argument("--model", type=Path, required=True, help="artifact: checkpoint directory or .gguf file")
    add_options(parser, EvalOptions, only=EVAL_FLAGS, flags=RENAMED)
    parser.add_argument("--write-report", action="store_true", help="also write report.json/report.md beside it")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.set_defaults(run=run)
