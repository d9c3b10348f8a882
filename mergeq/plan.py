"""Planning a run: which stages of which matrix row, what each needs first, and what it asks of the machine.

A plan is plain data, made before any work and the same for every executor (mergeq.executors): the rows and
columns of the matrix, and one StageTask per cell with its dependencies and its resource request. The request
comes from the stage's predicted peak (mergeq.budget, what `mergeq run --check` prints), so a scheduler never
puts two stages on a node that cannot hold both. Whether a stage still has to run is decided when it is about to
run (mergeq.stagework): an export's key hashes the merged checkpoint, which exists only after the merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mergeq import budget
from mergeq.matrix import Matrix

MERGE = "merge"


@dataclass(frozen=True)
class StageTask:
    model: str  # the matrix row ("" for a single-model run)
    stage: str  # "merge" or an export target
    out: Path  # the row's output directory
    needs: tuple[str, ...]  # ids of the tasks that must finish first
    peak_bytes: int  # predicted peak memory (mergeq.budget)
    threads: int  # torch threads the stage runs with (its key records them: GPTQ's sums depend on them)
    device: str  # "cpu", "cuda[:N]" or "auto" (int4 stages); "cpu" for the rest

    @property
    def id(self) -> str:
        return f"{self.model}/{self.stage}" if self.model else self.stage

    @property
    def label(self) -> str:
        return f"stage {self.stage}" + (f" of model {self.model}" if self.model else "")


@dataclass
class Plan:
    matrix: Matrix
    out: Path
    tasks: list[StageTask] = field(default_factory=list)  # in an order where every task follows what it needs
    budgets: dict[str, list[budget.StageBudget]] = field(default_factory=dict)  # row -> its stages' budgets

    @property
    def rows(self) -> list[str]:
        return list(self.matrix.models)

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(t.stage for t in self.tasks))

    def task(self, task_id: str) -> StageTask:
        return next(t for t in self.tasks if t.id == task_id)


def plan_run(matrix: Matrix, out: Path, *, threads: int | None = None) -> Plan:
    """One task per (row, stage): the merge, then every export of the merged checkpoint."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    plan = Plan(matrix, Path(out))
    shapes: dict[Path, budget.Shapes] = {}
    for name, config in matrix.models.items():
        base = Path(config.merge.base)
        if base not in shapes:
            shapes[base] = budget.read_shapes(base)
        budgets = budget.stage_budgets(config, shapes[base])
        plan.budgets[name] = budgets
        row_out = matrix.out_dir(out, name)
        peaks = {b.stage: b.peak_bytes for b in budgets}
        merge = StageTask(name, MERGE, row_out, (), peaks[MERGE], threads, "cpu")
        plan.tasks.append(merge)
        for target, options in config.exports.items():
            plan.tasks.append(
                StageTask(
                    name, target, row_out, (merge.id,), peaks[target], threads, str(getattr(options, "device", "cpu"))
                )
            )
    return plan
