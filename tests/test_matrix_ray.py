"""The export matrix (`[[model]]` tables) on the local executor and on a Ray cluster of separate processes.

3 adapters x (GGUF Q8_0, AWQ) on a tiny Llama (tests/matrix_models.py). On Ray, the worker node that runs the
first GGUF stage is lost (kill -9 of every process of it) while that stage is held at its first unit of work
(MERGEQ_FAULT=hold@gguf:1, set on that node only); a fresh node joins, Ray retries the stage there, the run
finishes, every artifact is byte-identical to the local executor's, and a second run skips every stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from matrix_models import build_matrix

from mergeq.config import ConfigError
from mergeq.matrix import load_matrix

REPO = Path(__file__).resolve().parent.parent
ROWS = ("task1", "task2", "task3")
STAGES = ("merge", "gguf", "awq")
DOC_FILES = ("report.json", "report.md", "README.md")
RUN_TIMEOUT = 1200  # a safety net for a hung run, never a measurement


def env(**extra: str) -> dict[str, str]:
    # one torch thread everywhere: each stage asks Ray for as many CPUs as the driver's torch uses, and the AWQ/GPTQ
    # keys record the thread count, so the local run and the Ray run must agree on it
    # RAY_AUTH_MODE explicit: Ray 2.60 turns token auth on for a cluster whose mode is unset when ~/.ray/auth_token
    # exists (a local `ray.init()` cluster writes one), and then refuses clients that do not send it
    base = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "RAY_AUTH_MODE": "disabled", **extra}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return base


def mergeq_run(config: Path, out: Path, *more: str, extra_env: dict[str, str] | None = None, wait: bool = True):
    argv = [sys.executable, "-m", "mergeq.cli", "run", str(config), "--out", str(out), "--json", *more]
    proc = subprocess.Popen(
        argv, env=env(**(extra_env or {})), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return finish(proc) if wait else proc


def finish(proc: subprocess.Popen) -> tuple[int, dict | None, str]:
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    try:
        return proc.returncode, json.loads(stdout), stderr
    except json.JSONDecodeError:
        return proc.returncode, None, stdout + stderr


def artifact_files(out: Path) -> dict[str, bytes]:
    """Every file of every artifact (not the reports, cards, summaries and state, which record times)."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file()
        and ".mergeq" not in p.relative_to(out).parts
        and p.name not in DOC_FILES
        and not p.name.startswith("summary.")
    }


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    return build_matrix(tmp_path_factory.mktemp("matrix"))


@pytest.fixture(scope="module")
def local_run(matrix, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    code, result, log = mergeq_run(matrix, out)
    assert code == 0 and result is not None, log
    return out, result


# ------------------------------------------------------------------------------------------ config


def test_matrix_rows_share_defaults_and_exports(matrix):
    parsed = load_matrix(matrix)
    assert list(parsed.models) == list(ROWS)
    for number, (name, config) in enumerate(parsed.models.items(), 1):
        assert config.merge.base == (matrix.parent / "base")
        assert [a.path.name for a in config.merge.adapters] == [f"adapter{number}"]
        assert list(config.exports) == ["gguf", "awq"]
        assert parsed.out_dir(Path("/o"), name) == Path("/o") / name


def test_single_model_config_stays_one_row_in_out(matrix, tmp_path):
    text = matrix.read_text()
    single = text.split("[[model]]")[0].replace("validate = false", 'validate = false\nadapters = ["adapter1"]')
    single += text[text.index("[eval]") :]
    (tmp_path / "adapter1").symlink_to(matrix.parent / "adapter1")
    config = tmp_path / "one.toml"
    config.write_text(single)
    parsed = load_matrix(config)
    assert parsed.single and parsed.out_dir(tmp_path / "o", "") == tmp_path / "o"


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda t: t.replace('name = "task2"', 'name = "task1"'), "used twice"),
        (lambda t: t.replace('name = "task3"', 'name = "../up"'), "must be a directory name"),
        (lambda t: t.replace("validate = false", 'validate = false\nadapters = ["x"]'), "only the defaults"),
        (lambda t: t.replace('adapter2"', 'missing-adapter"'), "[[model]] #2 (task2)"),
    ],
)
def test_matrix_config_errors_name_the_row(matrix, tmp_path, edit, expect):
    config = tmp_path / "bad.toml"
    config.write_text(edit(matrix.read_text()))
    with pytest.raises(ConfigError) as err:
        load_matrix(config)
    assert expect in str(err.value)


# ------------------------------------------------------------------------------------------ plan, requests, view


def test_plan_asks_ray_for_each_stage_peak_and_refuses_what_no_node_holds(matrix, tmp_path):
    from dataclasses import replace

    from mergeq.core.errors import MergeqError
    from mergeq.executors.ray import requests
    from mergeq.plan import plan_run

    plan = plan_run(load_matrix(matrix), tmp_path / "out", threads=2)
    assert [t.id for t in plan.tasks] == [f"{row}/{stage}" for row in ROWS for stage in STAGES]
    assert all(t.needs == (f"{t.model}/merge",) for t in plan.tasks if t.stage != "merge")
    peaks = {b.stage: b.peak_bytes for b in plan.budgets["task1"]}
    node = {"Alive": True, "Resources": {"CPU": 4.0, "memory": float(max(peaks.values()) + 1)}}
    wanted = requests(plan, [node])
    assert wanted["task2/awq"] == {"num_cpus": 2, "memory": peaks["awq"], "num_gpus": 0}
    assert wanted["task3/gguf"]["memory"] == peaks["gguf"]

    small = {"Alive": True, "Resources": {"CPU": 4.0, "memory": float(peaks["merge"] - 1)}}
    dead = {"Alive": False, "Resources": node["Resources"]}
    with pytest.raises(MergeqError) as err:
        requests(plan, [small, dead])
    assert "stage merge of model task1" in str(err.value) and "no node of the Ray cluster" in str(err.value)

    plan.tasks = [replace(t, device="auto") if t.stage == "awq" else t for t in plan.tasks]
    gpu_node = {"Alive": True, "Resources": {**node["Resources"], "GPU": 1.0}}
    assert requests(plan, [gpu_node])["task1/awq"]["num_gpus"] == 1
    assert requests(plan, [node])["task1/awq"]["num_gpus"] == 0


def test_matrix_view_shows_state_elapsed_and_retries(matrix, tmp_path):
    from mergeq.matrix_view import MatrixView
    from mergeq.plan import plan_run

    view = MatrixView(plan_run(load_matrix(matrix), tmp_path / "out", threads=1))
    view.started_task("task1/merge", "node-a:11")
    view.started_task("task1/merge", "node-b:12")  # a second start: the executor retried it
    assert "running" in view.text("task1/merge") and "(try 2)" in view.text("task1/merge")
    assert "@node-b:12" in view.text("task1/merge")
    view.finished("task1/merge", ran=True)
    view.finished("task2/merge", ran=False)
    view.failed("task3/merge")
    view.blocked("task3/gguf")
    states = view.states()
    assert (
        states["task1/merge"],
        states["task2/merge"],
        states["task3/merge"],
        states["task3/gguf"],
        states["task1/awq"],
    ) == ("done", "skipped", "failed", "blocked", "waiting")
    table = view.table()
    assert [c.header for c in table.columns] == ["artifact", *STAGES] and table.row_count == 3


# ------------------------------------------------------------------------------------------ local executor


@pytest.mark.llamacpp
def test_local_matrix_writes_one_directory_per_row_and_one_summary(local_run):
    out, result = local_run
    assert result["ran"] == [f"{row}/{stage}" for row in ROWS for stage in STAGES]
    for row in ROWS:
        assert (out / row / "merged" / "report.json").is_file()
        assert (out / row / "awq" / "report.json").is_file()
        assert (out / row / "gguf" / "Q8_0" / "report.json").is_file()
        assert (out / row / "summary.md").is_file()
    summary = json.loads((out / "summary.json").read_text())
    paths = sorted(a["path"] for a in summary["artifacts"])
    assert len(paths) == 9 and all(p.split("/")[0] in ROWS for p in paths)
    table = (out / "summary.md").read_text()
    assert all(f"| {row}: gguf Q8_0 |" in table for row in ROWS)
    # the rows differ (each its own adapter): their merged checkpoints are not the same bytes
    merged = {b"".join(p.read_bytes() for p in sorted((out / row / "merged").glob("*.safetensors"))) for row in ROWS}
    assert len(merged) == 3


# ------------------------------------------------------------------------------------------ Ray


@pytest.mark.llamacpp
@pytest.mark.slow
def test_ray_cluster_survives_a_lost_node_and_matches_the_local_run(matrix, local_run, tmp_path):
    from ray_cluster import LocalCluster

    local_out, _ = local_run
    cluster = LocalCluster(env=env())
    marker = tmp_path / "held.tsv"
    try:
        cluster.start_head(num_cpus=0)  # schedules, holds the driver's progress board; runs no stage
        doomed = cluster.add_worker(num_cpus=1, env={"MERGEQ_FAULT": f"hold@gguf:1:{marker}"})
        out = tmp_path / "ray-out"
        proc = mergeq_run(matrix, out, "--executor", "ray", "--address", cluster.address, wait=False)
        cluster.wait_for(
            lambda: marker.exists() or proc.poll() is not None,
            "a GGUF stage to reach its first unit of work on the doomed node",
            limit_s=RUN_TIMEOUT,
        )
        assert marker.exists(), finish(proc)[2]
        assert marker.read_text().startswith("gguf\t1\t")
        cluster.lose(doomed)  # the held stage's worker, its raylet and agents: kill -9, all at once
        cluster.add_worker(num_cpus=1)  # a fresh node without the fault: Ray retries the lost stage there
        code, result, log = finish(proc)
        assert code == 0 and result is not None, log
        assert sorted(result["ran"]) == sorted(f"{row}/{stage}" for row in ROWS for stage in STAGES)
        assert not list(out.rglob("*.tmp-*")), "a lost attempt left temporary files behind"

        ray_files, local_files = artifact_files(out), artifact_files(local_out)
        assert sorted(ray_files) == sorted(local_files)
        different = [name for name in local_files if ray_files[name] != local_files[name]]
        assert not different, f"not byte-identical to the local executor's: {different}"

        code, again, log = mergeq_run(matrix, out, "--executor", "ray", "--address", cluster.address)
        assert code == 0 and again is not None, log
        assert again["ran"] == [] and len(again["skipped"]) == 9
        assert artifact_files(out) == ray_files
    finally:
        cluster.stop()
