"""`mergeq run` as a driver: check every row of the matrix, plan the stage tasks, hand them to an executor while
the matrix view shows their progress, then write each row's summary and, for a matrix, one summary of all rows.

Layout: a single-model run writes into OUT as it always has; a matrix writes row NAME into OUT/NAME (its own
merged/, exports, reports, summary and `.mergeq/` state) and the comparison of all rows into OUT/summary.*.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from mergeq.core.atomic import write_json
from mergeq.matrix import Matrix, check_layout, matrix_reports
from mergeq.matrix_view import MatrixView
from mergeq.plan import plan_run
from mergeq.stages import STATE_DIR, run_lock

log = logging.getLogger(__name__)


def run_matrix(
    matrix: Matrix,
    out: Path,
    *,
    executor: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
    preflight_only: bool = False,
    verify: bool = False,
):
    """Run every stage of every row that is not up to date (see mergeq.pipeline.run_pipeline for the options).
    Returns a mergeq.pipeline.RunResult; `ran` and `skipped` name tasks (`STAGE`, or `ROW/STAGE` in a matrix)."""
    from mergeq import budget
    from mergeq.executors import get_executor
    from mergeq.pipeline import RunResult, check_out_dir, collect_reports, preflight

    out = Path(out)
    check_layout(matrix, out)
    for config in matrix.models.values():
        check_out_dir(config, out)
    for config in {config.merge.base: config for config in matrix.models.values()}.values():
        preflight(config)  # the exports' options against the base's shapes: the same for every row of one base
    plan = plan_run(matrix, out)
    pending = [
        b
        for name, row in plan.budgets.items()
        for b in row
        if not (matrix.out_dir(out, name) / STATE_DIR / "stages" / f"{b.stage}.json").is_file()
    ]
    result = RunResult(out, budgets=[b for row in plan.budgets.values() for b in row], plan=plan, pending=pending)
    if preflight_only:  # `--check` prints the budgets, then makes the same disk check (mergeq/commands/run.py)
        return result
    runner = get_executor(executor, address=address, num_cpus=num_cpus)
    budget.check_disk(pending, out, [b.stage for b in pending], one_at_a_time=executor == "local")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as locks:
            for folder in dict.fromkeys([out, *(matrix.out_dir(out, name) for name in matrix.models)]):
                folder.mkdir(parents=True, exist_ok=True)
                locks.enter_context(run_lock(folder))
            write_json(out / "resolved_config.json", matrix.resolved())
            for name, config in matrix.models.items():
                if not matrix.single:
                    write_json(matrix.out_dir(out, name) / "resolved_config.json", config.resolved())
            view = MatrixView(plan)
            with view.live():
                outcomes = runner.run(plan, view, verify=verify)
            for task in plan.tasks:
                (result.ran if outcomes[task.id].ran else result.skipped).append(task.id)
            result.reports = _summaries(matrix, out, collect_reports)
            return result
    except Exception:
        if created and not any(out.rglob(f"{STATE_DIR}/stages/*.json")):
            shutil.rmtree(out, ignore_errors=True)  # failed before any stage finished: leave no output behind
        raise


def _summaries(matrix: Matrix, out: Path, collect_reports) -> list:
    """Each row's summary in its own directory; for a matrix, all rows side by side in OUT/summary.*."""
    from exporters.summary import write_summary

    rows = {}
    for name in matrix.models:
        folder = matrix.out_dir(out, name)
        rows[name] = collect_reports(folder)
        write_summary(rows[name], folder)
    if matrix.single:
        return next(iter(rows.values()))
    reports = matrix_reports(rows)
    write_summary(reports, out)
    return reports
