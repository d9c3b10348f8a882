"""Run one exporter: preflight, export, evaluate each artifact against the reference, write its report.

Shared by `mergeq export` and the pipeline, so both produce the same artifacts and reports.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from exporters.eval_options import EvalOptions
from exporters.registry import get_exporter
from exporters.report import ArtifactReport

log = logging.getLogger(__name__)


def check_eval_text(reference: Path, options: EvalOptions) -> None:
    """Refuse, before any work, an evaluation text that the evaluation would refuse after the export
    (too short for two windows, not UTF-8, missing): a clear error and nothing written."""
    from exporters.eval_inputs import load_text, load_tokenizer
    from mergeq.core.metrics import make_windows, tokenize

    tokenizer = load_tokenizer(Path(reference))
    eval_text = load_text(options.text, tokenizer)
    ids, bos = tokenize(tokenizer, eval_text.text)
    make_windows(ids, options.n_ctx, options.max_windows, bos, source=str(eval_text.path))


def run_export(target: str, model_dir: Path, out_dir: Path, options, evaluation: EvalOptions) -> list[ArtifactReport]:
    """`evaluation.reference` None: each artifact is compared with model_dir."""
    exporter = get_exporter(target)()
    if evaluation.enabled:
        check_eval_text(evaluation.reference or model_dir, evaluation)
    for warning in exporter.preflight(model_dir, options):
        log.warning("%s: %s", target, warning)
    created = not Path(out_dir).exists()
    try:
        reports = exporter.export(model_dir, out_dir, options)
        for report in reports:
            if evaluation.enabled:
                from exporters.evaluate import evaluate_into_report

                evaluate_into_report(
                    report, reference=evaluation.reference or model_dir, text=evaluation.text, settings=evaluation
                )
            report.write(Path(report.path) if Path(report.path).is_dir() else Path(report.path).parent)
    except BaseException:
        if created:  # this command made the directory: a failed export or evaluation leaves none of it behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return reports
