"""One stage of one matrix row, run wherever an executor puts it: decide from its key whether it is done, and if
not, do it atomically and stamp it.

The stage keys and the work itself (merge, export, reports and model cards) live here. This is the unit every
executor runs (in this process, or as a Ray task on any node that sees the output directory). The key is computed
on the machine that runs the stage, from content hashes only: an export's key hashes the merged checkpoint's
files, so a rerun on another machine or cluster skips what is already done there. The executor opens the
file-stamp cache its stages hash through (mergeq.stages.file_stamps): the local one keeps one per row, as a single
run always has; a Ray task keeps one per stage (`.mergeq/stamps/STAGE.json`), so stages of one row that run at
the same time never overwrite each other's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from exporters.eval_options import EvalOptions
from exporters.report import ArtifactReport, StageCost
from merge.options import MergeConfig
from mergeq.config import PipelineConfig
from mergeq.core import faults
from mergeq.core.atomic import atomic_dir
from mergeq.core.errors import MergeqError
from mergeq.core.memory import peak_rss_bytes, release_freed_memory, reset_peak_rss, resident_bytes
from mergeq.core.versions import recorded_versions
from mergeq.exporting import run_export
from mergeq.plan import MERGE, StageTask
from mergeq.stages import Stage, stage_key, tree_hashes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageOutcome:
    task: str  # StageTask.id
    ran: bool  # False: it was up to date and skipped
    seconds: float


def stage_of(config: PipelineConfig, task: StageTask) -> Stage:
    """The stage with its content-addressed key (an export's needs the merged checkpoint on disk)."""
    tool_versions = recorded_versions()  # what the merge manifest records
    merged = task.out / "merged"
    if task.stage == MERGE:
        return Stage(
            MERGE, merged, stage_key(MERGE, _merge_inputs(config.merge), config.resolved()["merge"], tool_versions)
        )
    merged_hash = stage_key("merged", model_files(merged), {}, {})
    options = config.exports[task.stage]
    return Stage(
        task.stage,
        task.out / task.stage,
        stage_key(
            task.stage,
            {"merged": merged_hash, "eval": _eval_inputs(config.evaluation)},
            config.export_values(task.stage),
            {**tool_versions, **_tool_versions(task.stage, options)},
        ),
    )


def run_stage(config: PipelineConfig, task: StageTask) -> StageOutcome:
    """Run `task` unless its stamp says it is done; its output appears in one rename or not at all. Hashes go
    through the caller's file-stamp cache (mergeq.stages.file_stamps), if it opened one."""
    started = time.monotonic()
    out = task.out
    stage = stage_of(config, task)
    if stage.is_done(out):
        log.info("%s: unchanged inputs, options and versions, skipped", task.label)
        return StageOutcome(task.id, False, time.monotonic() - started)
    stage.clear(out)
    log.info("%s: running", task.label)
    faults.enter_stage(task.stage)
    merged = out / "merged"
    evaluation = replace(config.evaluation, reference=merged)
    try:
        with atomic_dir(stage.output, overwrite=True) as tmp:
            if task.stage == MERGE:
                _merge(config, tmp, evaluation)
            else:
                _export(task.stage, merged, tmp, config.exports[task.stage], evaluation, str(config.merge.base))
    except MergeqError as err:
        raise type(err)(f"{task.label} failed: {err}") from err
    stage.mark_done(out)
    seconds = time.monotonic() - started
    # what the stage freed goes back to the system before the next stage starts in this process (a pipeline
    # runs its stages one after another in one process; glibc otherwise keeps freed heap pages)
    release_freed_memory()
    rss = resident_bytes()
    log.info(
        "%s: done in %.1f s%s",
        task.label,
        seconds,
        f" (resident afterwards: {rss / 2**30:.2f} GiB)" if rss is not None else "",
    )
    return StageOutcome(task.id, True, seconds)


# ------------------------------------------------------------------------------------------ keys and work


def _merge_inputs(spec: MergeConfig) -> dict:
    inputs = {
        "base": tree_hashes(spec.base),
        "adapters": [{"files": tree_hashes(a.path), "weight": a.weight} for a in spec.adapters],
    }
    if spec.qlora_base:
        inputs["qlora_base"] = tree_hashes(spec.qlora_base)
    return inputs


def _eval_inputs(spec: EvalOptions) -> dict:
    return {"text": tree_hashes(spec.text) if spec.text else "demo", "enabled": spec.enabled}


def _tool_versions(target: str, options=None) -> dict:
    if target != "gguf":
        from mergeq.core.device import arithmetic_key, resolve_device

        # GPTQ's float sums run in another order with another thread count, device or CPU kernel set, and its
        # bytes change with them (on an H200, 39% of the packed words matched the CPU's)
        device = str(resolve_device(getattr(options, "device", "cpu")))
        return {**arithmetic_key(), "device": device}
    from exporters.llamacpp.pin import version_info
    from exporters.llamacpp.run import EVAL_WEIGHT_FLAGS

    versions = {"llama.cpp": version_info(), "llama_eval_flags": list(EVAL_WEIGHT_FLAGS)}
    if getattr(options, "targets", None):  # the size-budget search measures its candidates with the same flags
        versions["llama_budget_flags"] = list(EVAL_WEIGHT_FLAGS)
    return versions


def model_files(directory: Path) -> dict[str, str]:
    """The hashes of a checkpoint's model files: what downstream stages depend on (not its report or card)."""
    return {name: digest for name, digest in tree_hashes(directory).items() if name not in DOC_FILES}


DOC_FILES = ("report.json", "report.md", "README.md")


def _merge(config: PipelineConfig, tmp: Path, evaluation: EvalOptions) -> None:
    from merge.merger import run_merge

    spec = config.merge
    reset_peak_rss()
    started = time.perf_counter()
    run_merge(replace(spec, out=tmp, overwrite=True, eval_text=config.evaluation.text))
    merged = StageCost(round(time.perf_counter() - started, 3), peak_rss_bytes())  # validation included
    report = reference_report(tmp, spec)
    report.stages["merge"] = merged
    if evaluation.enabled:
        from exporters.evaluate import evaluate_into_report

        evaluate_into_report(report, reference=tmp, text=evaluation.text, settings=evaluation)
    _finish_reports([report], tmp, "merged", base_model=str(spec.base))


def reference_report(merged: Path, spec: MergeConfig) -> ArtifactReport:
    """The merged checkpoint's own report: the fp16/bf16 reference every export is compared with."""
    from exporters.eval_inputs import artifact_size

    size, quant = artifact_size(merged, merged)
    return ArtifactReport(
        format="hf",
        quant=quant,
        path=str(merged),
        size=size,
        provenance={"merge_manifest": "merge_manifest.json", "dtype": spec.dtype},
    )


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
