"""A `kill -9` in the middle of an int4 export, then the same command again: it resumes after the last finished
decoder layer and writes the same bytes as an export that was never interrupted.

The kill lands at a known layer however loaded the machine is: the run is held at the progress event of
layer 3 of 4 (MERGEQ_FAULT=hold@...), and the test kills its process group once the hold marker exists."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from int4_models import calibration_text, tiny_model

from exporters.int4.quant import QuantizedLinear
from exporters.int4.resume import LayerCheckpoints, LayerOutput
from mergeq.core.hashing import sha256_file

REPO = Path(__file__).resolve().parent.parent
LAYERS = 4
TIMEOUT = 600


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _export_argv(method: str, model: Path, out: Path, calib: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mergeq.cli",
        "export",
        method,
        "--model",
        str(model),
        "--out",
        str(out),
        "--calib",
        str(calib),
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--group-size",
        "32",
        "--no-eval",
        "--device",
        "cpu",
    ]


def _files(out: Path) -> dict[str, str]:
    """The model's files (the reports hold times and paths)."""
    return {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith("report.")}


def _resume_dirs(parent: Path) -> list[Path]:
    return sorted(parent.glob(".mergeq-int4-resume-*"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = tiny_model(root / "model", layers=LAYERS, hidden=64, intermediate=128)
    return root, model, calibration_text(root / "calib.txt", chars=4000)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_kill_9_mid_export_resumes_at_the_next_layer_with_identical_bytes(inputs, method):
    root, model, calib = inputs
    work = root / method
    work.mkdir()
    trace = work / "events.tsv"
    reference = work / "reference" / "out"
    done = subprocess.run(
        _export_argv(method, model, reference, calib),
        env=_env(MERGEQ_FAULT=f"progress@{trace}"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _resume_dirs(reference.parent) == [], "a finished export leaves its layer checkpoints behind"
    events = [line.split("\t")[2] for line in trace.read_text().splitlines()]
    at = events.index(f"{method} layers 3/{LAYERS}") + 1  # held as layer index 2 starts: layers 0 and 1 are done

    out = work / "killed" / "out"
    marker = work / "held"
    proc = subprocess.Popen(
        _export_argv(method, model, out, calib),
        env=_env(MERGEQ_FAULT=f"hold@:{at}:{marker}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert proc.poll() is None, f"the export ended before layer 3: {proc.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "the export never reached layer 3"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    assert not out.exists(), "a killed export left something that looks finished"
    [checkpoints] = _resume_dirs(out.parent)
    assert json.loads((checkpoints / "state.json").read_text())["done"] == 2

    rerun = subprocess.run(
        _export_argv(method, model, out, calib), env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming after layer 1 of {LAYERS}" in " ".join(rerun.stderr.split()), rerun.stderr[-3000:]
    assert _files(out) == _files(reference)
    assert _resume_dirs(out.parent) == []
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def _layer(seed: int) -> LayerOutput:
    g = torch.Generator().manual_seed(seed)
    q = QuantizedLinear(
        codes=torch.randint(0, 16, (8, 16), generator=g, dtype=torch.int32),
        scales=torch.rand(8, 1, generator=g).half(),
        zeros=torch.full((8, 1), 8, dtype=torch.int32),
        g_idx=torch.zeros(16, dtype=torch.int32),
        bias=None,
    )
    return LayerOutput(
        quantized={"self_attn.q_proj": q},
        tensors={"input_layernorm.weight": torch.rand(16, generator=g).half()},
        info={"alpha": {"attn_in": 0.35, "mlp_out": None}},
    )


def test_checkpoints_round_trip_and_refuse_other_inputs(tmp_path):
    folder = tmp_path / "ckpt"
    ckpt = LayerCheckpoints(folder, "key-a", layers=3)
    assert ckpt.start() == 0
    hidden = [torch.randn(2, 4, 16), torch.randn(1, 4, 16)]
    ckpt.save(0, _layer(0), hidden)
    ckpt.save(1, _layer(1), [h + 1 for h in hidden])
    assert not (folder / "hidden-00000.safetensors").exists(), "only the newest hidden states are kept"

    again = LayerCheckpoints(folder, "key-a", layers=3)
    assert again.start() == 2
    loaded = again.load(1)
    expected = _layer(1)
    assert list(loaded.quantized) == list(expected.quantized) and loaded.info == expected.info
    for field in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(
            getattr(loaded.quantized["self_attn.q_proj"], field), getattr(expected.quantized["self_attn.q_proj"], field)
        )
    assert loaded.quantized["self_attn.q_proj"].bias is None
    assert torch.equal(loaded.tensors["input_layernorm.weight"], expected.tensors["input_layernorm.weight"])
    assert all(torch.equal(a, b + 1) for a, b in zip(again.hidden(1), hidden))

    other = LayerCheckpoints(folder, "key-b", layers=3)  # another model, options or calibration: start over
    assert other.start() == 0 and not (folder / "layer-00000.safetensors").exists()

    (folder / "state.json").write_text(json.dumps({"key": "key-b", "layers": 3, "done": 2}))
    assert LayerCheckpoints(folder, "key-b", layers=3).done() == 0, "state names layers whose files are missing"


def test_the_resume_key_names_the_device_the_layers_ran_on(inputs, monkeypatch):
    """Layers computed on a GPU differ in their bytes from the CPU's: a run killed there and started again on the
    CPU (or with --device auto on a machine without one) must not resume from them. The key has the device as run,
    not as given ("auto")."""
    from exporters.int4 import export
    from exporters.int4.layer import EngineOptions
    from exporters.int4.options import GptqOptions
    from exporters.int4.quant import QuantScheme

    root, model, _ = inputs
    engine = EngineOptions(given=GptqOptions(device="auto"), scheme=QuantScheme(4, 32, True))
    tokens = torch.arange(64).reshape(2, 32)
    on_cpu = export.layer_checkpoints(model, root / "out", tokens, engine)
    assert on_cpu.key == export.layer_checkpoints(model, root / "out", tokens, engine).key
    monkeypatch.setattr(export, "resolve_device", lambda name: torch.device("cuda"))
    on_gpu = export.layer_checkpoints(model, root / "out", tokens, engine)
    assert on_gpu.key != on_cpu.key and on_gpu.directory != on_cpu.directory


def test_the_resume_key_names_the_cpu_kernels_and_threads(inputs, monkeypatch):
    """AVX2 and AVX-512 kernels round GPTQ's sums differently: layers computed on one CPU are not resumed on
    another (an output directory on shared storage, a moved disk); nor with another thread count."""
    from exporters.int4 import export
    from exporters.int4.layer import EngineOptions
    from exporters.int4.options import GptqOptions
    from exporters.int4.quant import QuantScheme

    root, model, _ = inputs
    engine = EngineOptions(given=GptqOptions(device="cpu"), scheme=QuantScheme(4, 32, True))
    tokens = torch.arange(64).reshape(2, 32)
    here = export.layer_checkpoints(model, root / "out", tokens, engine).key
    other = "AVX512" if torch.backends.cpu.get_cpu_capability() != "AVX512" else "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    assert export.layer_checkpoints(model, root / "out", tokens, engine).key != here
    monkeypatch.undo()
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    assert export.layer_checkpoints(model, root / "out", tokens, engine).key != here


def test_the_int4_stage_key_names_the_cpu_kernels(monkeypatch):
    from mergeq.stagework import _tool_versions

    here = _tool_versions("gptq")
    assert here["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and here["device"] == "cpu"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert _tool_versions("gptq") != here
    assert "cpu_capability" not in _tool_versions("gguf"), "llama.cpp's bytes do not depend on torch's kernels"
