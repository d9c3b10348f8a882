"""The local executor: every stage task in this process, one after another, in plan order (row by row)."""

from __future__ import annotations

import itertools

from mergeq.matrix_view import MatrixView
from mergeq.plan import Plan
from mergeq.stages import file_stamps
from mergeq.stagework import StageOutcome, run_stage


class LocalExecutor:
    name = "local"

    def run(self, plan: Plan, view: MatrixView, *, verify: bool = False) -> dict[str, StageOutcome]:
        outcomes: dict[str, StageOutcome] = {}
        for row, tasks in itertools.groupby(plan.tasks, key=lambda task: task.model):
            tasks = list(tasks)
            with file_stamps(tasks[0].out, verify=verify):  # one cache per row, saved when its stages are done
                for task in tasks:
                    view.started_task(task.id)
                    try:
                        outcome = run_stage(plan.matrix.models[row], task)
                    except BaseException:
                        view.failed(task.id)
                        for later in plan.tasks[plan.tasks.index(task) + 1 :]:
                            view.blocked(later.id)
                        raise
                    view.finished(task.id, outcome.ran)
                    outcomes[task.id] = outcome
        return outcomes
