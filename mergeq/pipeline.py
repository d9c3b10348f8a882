"""`mergeq run`: adapter -> merged fp16 -> every export -> reports, model cards and a summary.

Stages are incremental and resumable (mergeq.stages): unchanged stages are skipped, and a killed run
started again finishes with the same artifacts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from exporters.eval_options import EvalOptions
from exporters.report import ArtifactReport
from merge.options import MergeConfig
from mergeq.config import PipelineConfig, parse_config
from mergeq.core.errors import MergeqError
from mergeq.exporting import run_export
from mergeq.stages import tree_hashes

log = logging.getLogger(__name__)

DEMO_EXPORTS = {"gguf": {"quant": ["Q8_0", "Q4_K_M"]}, "awq": {"group_size": 64, "calib": "demo"},
                "gptq": {"group_size": 64, "calib": "demo"}}


@dataclass
class RunResult:
    out: Path
    reports: list[ArtifactReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    budgets: list = field(default_factory=list)  # mergeq.budget.StageBudget, filled by --check
    plan: object = None  # the mergeq.plan.Plan that ran (or would run, with --check)


def versions() -> dict[str, str]:
    """Package versions that change what every stage writes (the merge manifest records the same)."""
    from merge.manifest import versions as package_versions

    return package_versions()


def demo_config() -> PipelineConfig:
    """The embedded demo: demo base + demo QLoRA adapter -> merged -> GGUF Q8_0/Q4_K_M, AWQ, GPTQ."""
    from mergeq.demo import demo_assets

    assets = demo_assets()
    data = {
        # only the fp16 base: the adapter folder shows QLoRA training, so the merge rebuilds its NF4 base
        "merge": {"base": str(assets.base),
                  "adapters": [{"path": str(assets.adapter), "weight": 1.0}]},
        "eval": {"text": str(assets.eval_text)},
        **DEMO_EXPORTS,
    }
    return parse_config(data)


def check_out_dir(config: PipelineConfig, out: Path) -> None:
    """The output may not be inside an input, nor escape through a symlink."""
    out_resolved = out.resolve()
    if out.is_symlink() or any(p.is_symlink() for p in out.parents if p.exists() and p != p.parent and p.is_relative_to(Path.cwd())):
        raise MergeqError(f"output directory {out} goes through a symlink (to {out_resolved})",
                          hint="give the real path as --out")
    inputs = [config.merge.base, *(a.path for a in config.merge.adapters)]
    if config.merge.qlora_base:
        inputs.append(config.merge.qlora_base)
    for source in inputs:
        src = Path(source).resolve()
        if out_resolved == src or out_resolved.is_relative_to(src):
            raise MergeqError(f"output directory {out} is inside the input {source}",
                              hint="choose an --out directory outside every input")
        if src.is_relative_to(out_resolved):
            raise MergeqError(f"input {source} is inside the output directory {out}",
                              hint="choose an --out directory that holds no input")


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


def _merge_inputs(spec: MergeConfig) -> dict:
    inputs = {"base": tree_hashes(spec.base), "adapters": [
        {"files": tree_hashes(a.path), "weight": a.weight} for a in spec.adapters]}
    if spec.qlora_base:
        inputs["qlora_base"] = tree_hashes(spec.qlora_base)
    return inputs


def _eval_inputs(spec: EvalOptions) -> dict:
    return {"text": tree_hashes(spec.text) if spec.text else "demo", "enabled": spec.enabled}


def _tool_versions(target: str, options=None) -> dict:
    if target != "gguf":
        import torch

        from exporters.int4.layerwise import resolve_device

        # GPTQ's float sums run in another order with another thread count or device, and its bytes change
        # with them (on an H200, 39% of the packed words matched the CPU's)
        device = str(resolve_device(getattr(options, "device", "cpu")))
        return {"torch_threads": torch.get_num_threads(), "device": device}
    from exporters.llamacpp.pin import version_info

    return {"llama.cpp": version_info()}


def model_files(directory: Path) -> dict[str, str]:
    """The hashes of a checkpoint's model files: what downstream stages depend on (not its report or card)."""
    return {name: digest for name, digest in tree_hashes(directory).items() if name not in DOC_FILES}


DOC_FILES = ("report.json", "report.md", "README.md")


def _merge(config: PipelineConfig, tmp: Path, evaluation: EvalOptions) -> None:
    from merge.merger import run_merge

    spec = config.merge
    run_merge(replace(spec, out=tmp, overwrite=True, eval_text=config.evaluation.text))
    report = reference_report(tmp, spec)
    if evaluation.enabled:
        from exporters.evaluate import evaluate_into_report

        evaluate_into_report(report, reference=tmp, text=evaluation.text, settings=evaluation)
    _finish_reports([report], tmp, "merged", base_model=str(spec.base))


def reference_report(merged: Path, spec: MergeConfig) -> ArtifactReport:
    """The merged checkpoint's own report: the fp16/bf16 reference every export is compared with."""
    from exporters.evaluate import artifact_size

    size, quant = artifact_size(merged, merged)
    return ArtifactReport(format="hf", quant=quant, path=str(merged), size=size,
                          provenance={"merge_manifest": "merge_manifest.json", "dtype": spec.dtype})


def _export(target: str, merged: Path, tmp: Path, options, evaluation: EvalOptions, base_model: str) -> None:
    reports = run_export(target, merged, tmp, options, evaluation)
    _finish_reports(reports, tmp, target, base_model=base_model)


def _finish_reports(reports: list[ArtifactReport], stage_dir: Path, stage_name: str, *, base_model: str) -> None:
    """Make report paths relative to the run's output (they were written in a temporary stage dir), let no
    other field name that temporary dir, and add a model card to every artifact directory."""
    from mergeq.modelcard import write_model_card

    final_dir = stage_dir.parent / stage_name  # where atomic_dir renames the stage's temporary dir
    by_dir: dict[Path, list[ArtifactReport]] = {}
    for report in reports:
        report.provenance = _renamed(report.provenance, stage_dir, final_dir)
        report.extra = _renamed(report.extra, stage_dir, final_dir)
        report.warnings = _renamed(report.warnings, stage_dir, final_dir)
        artifact = Path(report.path)
        folder = artifact if artifact.is_dir() else artifact.parent
        report.path = (Path(stage_name) / artifact.relative_to(stage_dir)).as_posix()
        report.write(folder)
        by_dir.setdefault(folder, []).append(report)
    for folder, group in by_dir.items():
        write_model_card(group, base_model=base_model, artifact_dir=folder)


def _renamed(value, old: Path, new: Path):
    """`value` (JSON-like) with every string mention of directory `old` changed to `new`."""
    if isinstance(value, str):
        return value.replace(str(old), str(new))
    if isinstance(value, dict):
        return {k: _renamed(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, old, new) for v in value]
    return value


def collect_reports(out: Path) -> list[ArtifactReport]:
    from exporters.report import load_report

    return [load_report(p) for p in sorted(out.rglob("report.json")) if ".mergeq" not in p.parts]
