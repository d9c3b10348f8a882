"""One stage of one matrix row, run wherever an executor puts it: decide from its key whether it is done, and if
not, do it atomically and stamp it.

This is the unit every executor runs (in this process, or as a Ray task on any node that sees the output
directory). The key is computed here, on the machine that runs the stage, from content hashes only: an export's
key hashes the merged checkpoint's files, so a rerun on another machine or cluster skips what is already done
there. The executor opens the file-stamp cache its stages hash through (mergeq.stages.file_stamps): the local one
keeps one per row, as a single run always has; a Ray task keeps one per stage (`.mergeq/stamps/STAGE.json`), so
stages of one row that run at the same time never overwrite each other's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from mergeq.config import PipelineConfig
from mergeq.core import faults
from mergeq.core.atomic import atomic_dir
from mergeq.core.errors import MergeqError
from mergeq.plan import MERGE, StageTask
from mergeq.stages import Stage, stage_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageOutcome:
    task: str  # StageTask.id
    ran: bool  # False: it was up to date and skipped
    seconds: float


def stage_of(config: PipelineConfig, task: StageTask) -> Stage:
    """The stage with its content-addressed key (an export's needs the merged checkpoint on disk)."""
    from mergeq.pipeline import _eval_inputs, _merge_inputs, _tool_versions, model_files, versions

    tool_versions = versions()
    merged = task.out / "merged"
    if task.stage == MERGE:
        return Stage(MERGE, merged, stage_key(MERGE, _merge_inputs(config.merge), config.resolved()["merge"],
                                              tool_versions))
    merged_hash = stage_key("merged", model_files(merged), {}, {})
    options = config.exports[task.stage]
    return Stage(task.stage, task.out / task.stage, stage_key(
        task.stage, {"merged": merged_hash, "eval": _eval_inputs(config.evaluation)},
        config.export_values(task.stage), {**tool_versions, **_tool_versions(task.stage, options)}))


def run_stage(config: PipelineConfig, task: StageTask) -> StageOutcome:
    """Run `task` unless its stamp says it is done; its output appears in one rename or not at all. Hashes go
    through the caller's file-stamp cache (mergeq.stages.file_stamps), if it opened one."""
    from mergeq.pipeline import _export, _merge

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
    log.info("%s: done in %.1f s", task.label, seconds)
    return StageOutcome(task.id, True, seconds)
