"""`mergeq run`: adapter -> merged fp16 -> every export -> reports, model cards and a summary.

Stages are incremental and resumable (mergeq.stages): unchanged stages are skipped, and a killed run
started again finishes with the same artifacts. This module is the run's entry and its checks; the driver is
mergeq.runner, the plan mergeq.plan, each stage's key and work mergeq.stagework, the executors mergeq.executors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from exporters.report import ArtifactReport
from mergeq.config import PipelineConfig, parse_config
from mergeq.core.errors import MergeqError

log = logging.getLogger(__name__)

DEMO_EXPORTS = {
    "gguf": {"quant": ["Q8_0", "Q4_K_M"]},
    "awq": {"group_size": 64, "calib": "demo"},
    "gptq": {"group_size": 64, "calib": "demo"},
}


@dataclass
class RunResult:
    out: Path
    reports: list[ArtifactReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    budgets: list = field(default_factory=list)  # mergeq.budget.StageBudget, filled by --check
    plan: object = None  # the mergeq.plan.Plan that ran (or would run, with --check)
    pending: list = field(default_factory=list)  # the budgets of the stages not done yet


def demo_config() -> PipelineConfig:
    """The embedded demo: demo base + demo QLoRA adapter -> merged -> GGUF Q8_0/Q4_K_M, AWQ, GPTQ."""
    from mergeq.demo import demo_assets

    assets = demo_assets()
    data = {
        # only the fp16 base: the adapter folder shows QLoRA training, so the merge rebuilds its NF4 base
        "merge": {"base": str(assets.base), "adapters": [{"path": str(assets.adapter), "weight": 1.0}]},
        "eval": {"text": str(assets.eval_text)},
        **DEMO_EXPORTS,
    }
    return parse_config(data)


def check_out_dir(config: PipelineConfig, out: Path) -> None:
    """The output may not be inside an input, nor escape through a symlink."""
    out_resolved = out.resolve()
    if out.is_symlink() or any(
        p.is_symlink() for p in out.parents if p.exists() and p != p.parent and p.is_relative_to(Path.cwd())
    ):
        raise MergeqError(
            f"output directory {out} goes through a symlink (to {out_resolved})", hint="give the real path as --out"
        )
    inputs = [config.merge.base, *(a.path for a in config.merge.adapters)]
    if config.merge.qlora_base:
        inputs.append(config.merge.qlora_base)
    for source in inputs:
        src = Path(source).resolve()
        if out_resolved == src or out_resolved.is_relative_to(src):
            raise MergeqError(
                f"output directory {out} is inside the input {source}",
                hint="choose an --out directory outside every input",
            )
        if src.is_relative_to(out_resolved):
            raise MergeqError(
                f"input {source} is inside the output directory {out}",
                hint="choose an --out directory that holds no input",
            )


def run_pipeline(config: PipelineConfig, out: Path, *, preflight_only: bool = False, verify: bool = False) -> RunResult:
    """Run every stage that is not up to date. `verify` re-reads every input and output to decide that, instead
    of trusting the files whose size, times and inode are unchanged since the last run. `preflight_only`
    (`--check`) stops after the checks, with the predicted peak memory and disk of every stage in `budgets`.
    A matrix of models, or another executor: mergeq.runner.run_matrix."""
    from mergeq.matrix import single
    from mergeq.runner import run_matrix

    return run_matrix(single(config), out, preflight_only=preflight_only, verify=verify)


def preflight(config: PipelineConfig) -> None:
    """Every exporter checks its options against the base's shapes before any work starts."""
    from exporters.registry import get_exporter

    for target, options in config.exports.items():
        for warning in get_exporter(target)().preflight(config.merge.base, options):
            log.warning("%s: %s", target, warning)
    if config.evaluation.enabled:
        from mergeq.exporting import check_eval_text

        check_eval_text(config.merge.base, config.evaluation)  # the merged model keeps the base's tokenizer


def collect_reports(out: Path) -> list[ArtifactReport]:
    from exporters.report import load_report

    return [load_report(p) for p in sorted(out.rglob("report.json")) if ".mergeq" not in p.parts]
