"""Executors run a plan's stage tasks (mergeq.plan) and report each one's progress to the matrix view.

- `local` (the default): one stage after another, in this process.
- `ray`: each stage a Ray task on a cluster (an existing one, or a local one started for the run), its resource
  request taken from the stage's predicted peak.

Both run the same unit of work (mergeq.stagework.run_stage), so they skip, write and stamp the same files. Both
stop scheduling at the first failure and raise it (the stages already finished stay finished).
"""

from __future__ import annotations

EXECUTORS = ("local", "ray")


def get_executor(name: str, *, address: str | None = None, num_cpus: int | None = None):
    if name == "local":
        from mergeq.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from mergeq.executors.ray import RayExecutor

        return RayExecutor(address=address, num_cpus=num_cpus)
    from mergeq.core.errors import MergeqError

    raise MergeqError(f"unknown executor {name!r}", hint=f"use one of {', '.join(EXECUTORS)}")
