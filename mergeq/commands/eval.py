"""`mergeq eval --model PATH [--reference PATH] [--text FILE] [--json]`: one artifact's quality report."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def run(args) -> int:
    from exporters.evaluate import EvalOptions, detect_format, evaluate_into_report
    from exporters.report import print_reports
    from mergeq.core.errors import MergeqError

    model = Path(args.model)
    kind = detect_format(model)
    reference = args.reference
    if reference is None:
        if kind != "hf":
            raise MergeqError(f"{model} is a quantized artifact: say what to compare it with",
                              hint="pass --reference DIR, the fp16 checkpoint it was exported from")
        reference = model
    report = artifact_report(model, Path(reference), kind)
    options = EvalOptions(n_ctx=args.n_ctx, max_windows=args.windows, device=args.device)
    from mergeq.textopts import resolve_text_option

    text = resolve_text_option(args.text, option="--text", purpose="evaluation")
    evaluate_into_report(report, reference=Path(reference), text=text, settings=options)
    if args.write_report:
        where = model if model.is_dir() else model.parent
        log.info("wrote %s", report.write(where))
    print_reports([report], as_json=args.json)
    return 0


def artifact_report(model: Path, reference: Path, kind: str):
    """The artifact's own report.json if mergeq wrote one beside it (quality cleared), else a size-only report."""
    from exporters.report import ArtifactReport, load_report
    from exporters.evaluate import artifact_size

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
    import json

    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    return str(config["quantization_config"]["quant_method"])


def register(sub) -> None:
    parser = sub.add_parser("eval", help="perplexity, KL divergence and top-1 agreement of one artifact")
    parser.add_argument("--model", type=Path, required=True, help="artifact: checkpoint directory or .gguf file")
    parser.add_argument("--reference", type=Path, help="fp16 checkpoint to compare with (default: --model itself)")
    parser.add_argument("--text", help="evaluation text, required: .txt; .jsonl with a \"text\" field or chat "
                                       "\"messages\"; .parquet:COLUMN; `demo` for the demo's text")
    parser.add_argument("--n-ctx", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--windows", type=int, default=16, help="most windows to score (default 16)")
    parser.add_argument("--device", default="cpu",
                        help="where the layer-by-layer forward passes run: cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--write-report", action="store_true", help="also write report.json/report.md beside it")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.set_defaults(run=run)
