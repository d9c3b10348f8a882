"""The Ray executor: each stage task becomes a Ray task, scheduled by Ray across the nodes of a cluster.

- Cluster: `address` connects to a running cluster (`ray start --head` elsewhere; `auto` finds the one on this
  machine); without it a local cluster is started for the run and stopped after it.
- Resources: a task asks for its stage's torch threads as CPUs, its predicted peak (mergeq.budget) as memory, and a
  GPU when its device is CUDA (or `auto` on a cluster that has GPUs), so Ray never puts two stages on a node that
  cannot hold both. A stage that no node of the cluster can hold is refused before any work.
- Output: every node writes into the run's output directory, which must be the same path on every node (a shared
  file system). Stages write atomically and stamp their keys there, exactly as locally.
- Failures: a task whose worker or node dies is retried by Ray (MAX_RETRIES); its next attempt clears the dead
  one's temporary files and starts the stage again. An error raised by a stage is not retried: it stops the run.
- Progress: each attempt tells a small actor on the driver's node that it started, and where; the driver polls it
  and draws the matrix view.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time

from mergeq.core.errors import MergeqError
from mergeq.matrix_view import MatrixView
from mergeq.plan import Plan, StageTask
from mergeq.stagework import StageOutcome, run_stage

log = logging.getLogger(__name__)

MAX_RETRIES = 3  # attempts after the first when a worker process or node dies
POLL_S = 0.5
GIB = 1 << 30
LOCAL_OBJECT_STORE = 256 << 20  # a local cluster's object store: tasks pass only stage outcomes, artifacts go to disk


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address, self.num_cpus = address, num_cpus

    def run(self, plan: Plan, view: MatrixView, *, verify: bool = False) -> dict[str, StageOutcome]:
        ray = _import_ray()
        connected_here = not ray.is_initialized()
        # Ray's driver prints the cluster's error messages (a node marked dead, ...) on stdout: they go to stderr,
        # stdout carries only mergeq's results (`--json`)
        with contextlib.redirect_stdout(sys.stderr):
            if connected_here:
                _connect(ray, self.address, self.num_cpus)
            try:
                return _run(ray, plan, view, verify)
            finally:
                if connected_here:
                    ray.shutdown()  # a local cluster started for the run stops; a remote one is only left


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise MergeqError(
            "--executor ray needs the `ray` package, which is not installed",
            hint="pip install 'mergeq[ray]' (or ray) on the driver and on every node",
        ) from err
    return ray


def _connect(ray, address: str | None, num_cpus: int | None) -> None:
    kwargs = {"log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise MergeqError(
            f"cannot connect to {where}: {err}",
            hint="start the head with `ray start --head` and pass its address (HOST:6379), or omit "
            "--address to start a local cluster",
        ) from err


def requests(plan: Plan, nodes: list[dict]) -> dict[str, dict]:
    """Each task's Ray resource request, checked against the cluster's nodes before any work."""
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    has_gpus = any(r.get("GPU", 0) > 0 for r in alive)
    wanted = {}
    for task in plan.tasks:
        gpus = 1 if task.device.startswith("cuda") or (task.device == "auto" and has_gpus) else 0
        request = {"num_cpus": task.threads, "memory": task.peak_bytes, "num_gpus": gpus}
        if not any(
            r.get("CPU", 0) >= task.threads and r.get("memory", 0) >= task.peak_bytes and r.get("GPU", 0) >= gpus
            for r in alive
        ):
            largest = max(alive, key=lambda r: (r.get("memory", 0), r.get("CPU", 0)), default={})
            raise MergeqError(
                f"{task.label} asks for {task.threads} CPUs, {task.peak_bytes / GIB:.2f} GiB of memory (its "
                f"predicted peak, see mergeq run --check)"
                + (" and a GPU" if gpus else "")
                + f", and no node of the Ray cluster offers that (the largest: {largest.get('CPU', 0):g} CPUs, "
                f"{largest.get('memory', 0) / GIB:.2f} GiB, {largest.get('GPU', 0):g} GPUs)",
                hint="add a node that large (ray start --num-cpus N --memory BYTES), or run the driver with fewer "
                "torch threads (OMP_NUM_THREADS): each stage asks for as many CPUs as the driver's torch uses",
            )
        wanted[task.id] = request
    return wanted


def _run(ray, plan: Plan, view: MatrixView, verify: bool) -> dict[str, StageOutcome]:
    wanted = requests(plan, ray.nodes())
    board = _board_actor(ray)
    remote = ray.remote(_stage_task)
    refs: dict[str, object] = {}
    for task in plan.tasks:
        refs[task.id] = remote.options(
            **wanted[task.id],
            name=task.id,
            max_retries=MAX_RETRIES,
            retry_exceptions=False,
        ).remote(plan.matrix.models[task.model], task, verify, board, *(refs[n] for n in task.needs))
    pending = {ref: task_id for task_id, ref in refs.items()}
    outcomes: dict[str, StageOutcome] = {}
    seen = 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            seen = _poll_starts(ray, board, view, seen)
            for ref in ready:
                task_id = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    view.failed(task_id)
                    raise _cause(err) from None
                except ray.exceptions.RayError as err:
                    view.failed(task_id)
                    raise MergeqError(
                        f"{plan.task(task_id).label} was lost by Ray after {MAX_RETRIES} retries: {err}",
                        hint="see the Ray logs of the nodes (ray logs ...)",
                    ) from err
                seen = _poll_starts(ray, board, view, seen)  # its start, if it finished between two polls
                view.finished(task_id, outcome.ran)
                outcomes[task_id] = outcome
    finally:
        for ref, task_id in pending.items():  # a failure stops the run: nothing new starts, running stages stop
            view.blocked(task_id)
            ray.cancel(ref, force=True)
    return outcomes


def _cause(err) -> BaseException:
    """The stage's own exception (a MergeqError keeps its message and exit code), not Ray's wrapper."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else MergeqError(str(err))


def _poll_starts(ray, board, view: MatrixView, seen: int) -> int:
    try:
        events = ray.get(board.since.remote(seen), timeout=10)
    except ray.exceptions.RayError as err:  # the view loses a detail; the run goes on
        log.debug("progress board unreachable: %s", err)
        return seen
    for task_id, where in events:
        view.started_task(task_id, where)
    return seen + len(events)


class _Board:
    """Start events of task attempts, in arrival order (a retried task starts again)."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def started(self, task_id: str, where: str) -> None:
        self.events.append((task_id, where))

    def since(self, number: int) -> list[tuple[str, str]]:
        return self.events[number:]


def _board_actor(ray):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(_Board)
        .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=True))
        .remote()
    )


def _stage_task(config, task: StageTask, verify: bool, board, *needs: StageOutcome) -> StageOutcome:
    """One attempt at one stage, in a Ray worker. `needs` are the outcomes of the stages it depends on: Ray starts
    it only once they have finished."""
    import torch

    from mergeq.stages import file_stamps

    board.started.remote(task.id, f"{socket.gethostname()}:{os.getpid()}")
    torch.set_num_threads(task.threads)  # what the stage's key records, as in the driver's process
    started = time.monotonic()
    with file_stamps(task.out, verify=verify, name=task.stage):  # its own cache: stages of a row run side by side
        outcome = run_stage(config, task)
    log.info("%s: attempt finished in %.1f s", task.label, time.monotonic() - started)
    return outcome
