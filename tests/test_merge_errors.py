"""Every bad input of issue 2: a clear message (asserted) and nothing written."""

from __future__ import annotations

import json
import warnings

import pytest
from safetensors.torch import load_file, save_file

from merge.merger import AdapterRef, MergeConfig, run_merge
from mergeq.cli import main
from mergeq.core.errors import MergeqError


@pytest.fixture
def llama(tmp_path, builders):
    return builders.llama(tmp_path / "base")


@pytest.fixture
def lora(tmp_path, builders, llama):
    return builders.adapter(llama, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def refuse(tmp_path, *fragments, base=None, adapters=(), out=None, **kw):
    out = out or tmp_path / "new" / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    config = MergeConfig(base=base, adapters=[AdapterRef(a, 1.0) for a in adapters], out=out, validate=False, **kw)
    with pytest.raises(MergeqError) as err:
        run_merge(config)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == before, f"something was written: {set(after) - set(before)}"
    return message


def test_adapter_from_another_base_lists_mismatches(tmp_path, builders, llama):
    other = builders.llama(tmp_path / "other", hidden=48, intermediate=96)
    adapter = builders.adapter(other, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    message = refuse(
        tmp_path,
        "shape mismatch",
        "model.layers.0.self_attn.q_proj: base [32, 32], adapter expects [48, 48]",
        base=llama,
        adapters=[adapter],
    )
    assert "trained on another base" in message


def test_target_module_matching_nothing(tmp_path, builders, llama):
    gpt2 = builders.gpt2(tmp_path / "gpt2")
    adapter = builders.adapter(
        gpt2, tmp_path / "adapter", r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn"]
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/some-model"  # a hub id: no config to compare architectures
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    refuse(tmp_path, "match nothing in the base", "transformer.h.0.attn.c_attn", base=llama, adapters=[adapter])


def test_adapter_recorded_for_another_architecture(tmp_path, builders, llama):
    gpt2 = builders.gpt2(tmp_path / "gpt2")
    adapter = builders.adapter(
        gpt2, tmp_path / "adapter", r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn"]
    )
    refuse(tmp_path, "GPT2LMHeadModel", "LlamaForCausalLM", "the models do not", base=llama, adapters=[adapter])


def test_truncated_base_file(tmp_path, llama, lora):
    path = llama / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    refuse(tmp_path, "model.safetensors", "truncated", base=llama, adapters=[lora])


def test_corrupt_header_in_base(tmp_path, llama, lora):
    path = llama / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8] = ord("#")  # the JSON header no longer parses
    path.write_bytes(bytes(data))
    refuse(tmp_path, "model.safetensors", "not valid JSON", base=llama, adapters=[lora])


def test_nan_in_adapter(tmp_path, llama, lora):
    path = lora / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)
    refuse(tmp_path, "NaN or Inf", key, base=llama, adapters=[lora])


def test_inf_in_adapter(tmp_path, llama, lora):
    path = lora / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[-1]
    tensors[key][-1, -1] = float("inf")
    save_file(tensors, path)
    refuse(tmp_path, "NaN or Inf", key, base=llama, adapters=[lora])


def test_shard_path_escaping_its_folder(tmp_path, llama, lora):
    (llama / "model.safetensors").rename(tmp_path / "stolen.safetensors")
    names = load_file(tmp_path / "stolen.safetensors")
    (llama / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "../stolen.safetensors" for n in names}})
    )
    refuse(tmp_path, "escapes the checkpoint folder", "../stolen.safetensors", base=llama, adapters=[lora])


def test_output_exists_and_is_not_empty(tmp_path, llama, lora):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refuse(tmp_path, "exists and is not empty", "--overwrite", base=llama, adapters=[lora], out=out)
    assert (out / "keep.txt").read_text() == "mine"
    run_merge(MergeConfig(base=llama, adapters=[AdapterRef(lora)], out=out, validate=False, overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "merge_manifest.json").is_file()


def test_empty_existing_output_is_fine(tmp_path, llama, lora):
    out = tmp_path / "empty"
    out.mkdir()
    run_merge(MergeConfig(base=llama, adapters=[AdapterRef(lora)], out=out, validate=False))
    assert (out / "config.json").is_file()


def test_output_inside_the_input(tmp_path, llama, lora):
    refuse(tmp_path, "is inside the input", base=llama, adapters=[lora], out=llama / "merged")
    assert not (llama / "merged").exists()
    refuse(tmp_path, "is inside the input", base=llama, adapters=[lora], out=lora / "merged")


def test_input_inside_the_output(tmp_path, llama, lora):
    refuse(tmp_path, "is inside the output", base=llama, adapters=[lora], out=tmp_path, overwrite=True)


@pytest.mark.parametrize("kind", ["IA3", "LOHA", "LOKR", "ADALORA"])
def test_other_peft_types_are_not_supported(tmp_path, llama, kind):
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = {
        "IA3": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "LOHA": LoHaConfig(r=4, target_modules=["q_proj"]),
        "LOKR": LoKrConfig(r=4, target_modules=["q_proj"]),
        "ADALORA": AdaLoraConfig(r=4, target_modules=["q_proj"], total_step=10),
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama), config)
        model.save_pretrained(tmp_path / "adapter")
    refuse(tmp_path, f"not supported: {kind}", base=llama, adapters=[tmp_path / "adapter"])


def test_unsupported_lora_variant(tmp_path, llama, lora):
    config = json.loads((lora / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"
    (lora / "adapter_config.json").write_text(json.dumps(config))
    refuse(tmp_path, "not supported", "pissa", base=llama, adapters=[lora])


@pytest.mark.parametrize("target", ["q_proj", "up_proj"])  # the overflowing tensor copied through / merged
def test_fp16_overflow_suggests_bfloat16(tmp_path, builders, target):
    base = builders.llama(tmp_path / "base")
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = 70000.0
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    adapter = builders.adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=[target])
    refuse(tmp_path, "model.layers.1.mlp.up_proj.weight", "65504", "--dtype bfloat16", base=base, adapters=[adapter])
    out = tmp_path / "bf16"
    run_merge(MergeConfig(base=base, adapters=[AdapterRef(adapter)], out=out, dtype="bfloat16", validate=False))
    assert (
        abs(
            float(load_file(out / "model-00001-of-00001.safetensors")["model.layers.1.mlp.up_proj.weight"][0, 0])
            - 70000
        )
        < 500
    )


def test_nan_in_base_is_caught(tmp_path, builders):
    base = builders.llama(tmp_path / "base")
    tensors = load_file(base / "model.safetensors")
    tensors["model.norm.weight"][3] = float("inf")
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    adapter = builders.adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    refuse(tmp_path, "model.norm.weight", "NaN or Inf", base=base, adapters=[adapter])


def test_cli_reports_errors_without_traceback(tmp_path, llama, lora, capsys):
    out = tmp_path / "x" / "out"
    code = main(
        ["merge", "--base", str(llama), "--adapter", f"{lora}@0.5", "--out", str(llama / "sub"), "--no-validate"]
    )
    assert code == 2
    printed = " ".join(capsys.readouterr().err.split())
    assert "is inside the input" in printed and "Traceback" not in printed
    code = main(
        [
            "-q",
            "merge",
            "--base",
            str(llama),
            "--adapter",
            f"{lora}@0.5",
            "--out",
            str(out),
            "--no-validate",
            "--dtype",
            "bfloat16",
        ]
    )
    assert code == 0
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["inputs"]["adapters"][0]["weight"] == 0.5
    scales = manifest["inputs"]["adapters"][0]["applied_scales"]
    assert scales["model.layers.0.self_attn.q_proj"] == pytest.approx(0.5 * 8 / 4)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_an_error_before_the_merge_stops_the_input_digests(tmp_path, llama, lora, monkeypatch):
    """The inputs are hashed in the background from the start; a refusal does not wait for a 16 GB base's
    digest: the digest sees its stop event set and ends."""
    import threading

    from mergeq.core import hashing
    from mergeq.core.hashing import HashingStopped

    seen = []

    def slow_digest(path, stop=None):
        seen.append(stop.wait(timeout=120))  # a digest that would take two minutes unless stopped
        raise HashingStopped(str(path))

    monkeypatch.setattr(hashing, "sha256_file", slow_digest)
    monkeypatch.setenv("MERGEQ_CACHE", str(tmp_path / "cache"))  # no digest kept from an earlier merge
    path = lora / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[sorted(tensors)[0]][0, 0] = float("nan")
    save_file(tensors, path)
    refuse(tmp_path, "NaN or Inf", base=llama, adapters=[lora])
    assert seen == [True], seen  # the first digest was stopped; the others never started
    assert not [t for t in threading.enumerate() if t.name.startswith("mergeq-hash")]


def test_each_input_file_is_hashed_once(tmp_path, llama, lora, monkeypatch):
    from merge import manifest
    from mergeq.core import hashing

    read = []
    real = hashing.sha256_file

    def counting(path, stop=None):
        read.append(path.name)
        return real(path, stop)

    def no_second_pass(*args, **kwargs):
        raise AssertionError(f"hashed again for the manifest: {args}")

    monkeypatch.setattr(hashing, "sha256_file", counting)
    monkeypatch.setenv("MERGEQ_CACHE", str(tmp_path / "cache"))  # no digest kept from an earlier merge
    monkeypatch.setattr(manifest, "tree_hashes", no_second_pass)
    out = tmp_path / "out"
    run_merge(MergeConfig(base=llama, adapters=[AdapterRef(lora, 1.0)], out=out, validate=False))
    inputs = [p.name for folder in (llama, lora) for p in folder.iterdir() if p.is_file()]
    assert sorted(read) == sorted(inputs)
    recorded = json.loads((out / "merge_manifest.json").read_text())
    assert set(recorded["inputs"]["sources"]["base"]["files"]) == {p.name for p in llama.iterdir() if p.is_file()}


COMMAND_DIGESTS = """
import json, sys
import merge.digests as digests

started = []
real = digests.InputDigests.__init__


def recording(self, *args, **kwargs):
    started.append("torch" in sys.modules)
    real(self, *args, **kwargs)


digests.InputDigests.__init__ = recording
from mergeq.cli import main

code = main(["-q", "merge", "--base", sys.argv[1], "--adapter", sys.argv[2], "--out", sys.argv[3], "--no-validate"])
print(json.dumps({"code": code, "started": started}))
"""


def test_the_merge_command_hashes_its_inputs_from_before_torch_is_imported(tmp_path, llama, lora):
    """`mergeq merge` starts the inputs' digests before it imports torch, and the merge uses those: one start,
    with torch not yet loaded, and the manifest's hashes are the files' own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mergeq.core.hashing import sha256_file

    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MERGEQ_CACHE": str(tmp_path / "cache"), "MERGEQ_QUIET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", COMMAND_DIGESTS, str(llama), str(lora), str(out)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "started": [False]}, result
    recorded = json.loads((out / "merge_manifest.json").read_text())["inputs"]["sources"]["base"]["files"]
    assert recorded == {p.name: sha256_file(p) for p in sorted(llama.iterdir()) if p.is_file()}
