"""`--exclude REGEX` keeps decoder-layer linears in fp16: the int4 checkpoint stores them as plain weights,
each format's quantization_config names them the way its loaders read (GPTQ's negative `dynamic` rules, AWQ's
modules_to_not_convert, compressed-tensors' ignore), folds that AWQ makes into a kept linear are still
applied, and patterns that match nothing or split a layer vLLM fuses are refused before any work.
vLLM's own reading of these configs: tests/test_int4_kernels_vllm.py."""

from __future__ import annotations

import json
import re

import pytest
import torch
from int4_models import calibration_text, int4_options, tiny_model
from safetensors.torch import load_file

from exporters.int4.exclude import Exclusions, resolve
from exporters.int4.export import export_int4, plan
from exporters.int4.formats import dequantized_state_dict, read_quantized
from mergeq.core.errors import MergeqError
from mergeq.core.modelfiles import read_model_config

LAYER0 = [
    f"model.layers.0.{m}"
    for m in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj")
    + ("self_attn.q_proj", "self_attn.v_proj")
]


def _options(method, calib, **kw):
    return int4_options(method, calib=calib, samples=8, seq_len=64, group_size=32, device="cpu", **kw)


def _plain(folder) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state |= load_file(shard)
    return state


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("exclude")
    return tiny_model(root / "base", "llama"), calibration_text(root / "calib.txt")


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_kept_linears_are_plain_fp16_and_named_in_the_config(tmp_path, model, fmt):
    base, calib = model
    method = "awq" if fmt == "awq" else "gptq"
    extra = {"format": "compressed-tensors"} if fmt == "compressed-tensors" else {}
    report = export_int4(base, tmp_path / "out", _options(method, calib, exclude=(r"layers\.0\.",), **extra))
    out = tmp_path / "out"
    linears, plain = read_quantized(out)
    assert not set(LAYER0) & set(linears) and all(f"model.layers.1.{n[15:]}" in linears for n in LAYER0)
    source = _plain(base)
    stored = _plain(out)
    for name in LAYER0:
        assert stored[f"{name}.weight"].dtype == torch.float16
        # nothing in layer 0 is quantized, so no AWQ fold touches it: the fp16 weights as given
        assert torch.equal(stored[f"{name}.weight"], source[f"{name}.weight"].to(torch.float16)), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":
        rules = [k.removeprefix("-:") for k in qc["dynamic"]]
        assert all(v == {} for v in qc["dynamic"].values()) and all(k.startswith("-:") for k in qc["dynamic"])
        vllm_names = LAYER0 + ["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"]
        for name in vllm_names:  # transformers / GPTQModel match these names, vLLM the fused ones
            assert any(re.match(r, name) for r in rules), name
        assert not any(re.match(r, name.replace(".0.", ".1.")) for r in rules for name in vllm_names)
        assert json.loads((out / "quantize_config.json").read_text())["dynamic"] == qc["dynamic"]
    elif fmt == "awq":
        assert qc["modules_to_not_convert"] == sorted(LAYER0)
    else:
        assert qc["ignore"] == ["lm_head", *sorted(LAYER0)]
    assert report.extra["excluded_linears"] == sorted(LAYER0)
    assert report.size.tensor_types["int4-packed"] == len(linears)


def test_without_exclusions_the_configs_are_as_before(tmp_path, model):
    base, _ = model
    for method in ("gptq", "awq"):
        the_plan = plan(base, _options(method, None))
        assert the_plan.excluded == Exclusions() and not the_plan.excluded
    from exporters.int4.formats import FORMATS
    from exporters.int4.quant import QuantScheme

    scheme = QuantScheme(bits=4, group_size=32, sym=True)
    assert "dynamic" not in FORMATS["gptq"].quantization_config(scheme, False, 0.01)
    assert FORMATS["awq"].quantization_config(scheme, False, None)["modules_to_not_convert"] is None
    assert FORMATS["compressed-tensors"].quantization_config(scheme, False, None)["ignore"] == ["lm_head"]


def test_an_awq_fold_into_a_kept_linear_is_applied(tmp_path, model):
    """Layer 0's down_proj is quantized and its AWQ scales fold into up_proj, which is kept: the fold must
    reach the fp16 up_proj, else the layer computes something else. Measured as the loss of the dequantized
    model against the fp16 one, with the same exclusions without AWQ's folds (GPTQ) beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporters.int4.calibration import load_calibration

    base, calib = model
    pattern = r"layers\.0\.mlp\.(gate|up)_proj$"
    export_int4(base, tmp_path / "awq", _options("awq", calib, exclude=(pattern,)))
    stored = _plain(tmp_path / "awq")
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(stored[up], _plain(base)[up].to(torch.float16)), "no fold reached the kept up_proj"
    tokens = load_calibration(calib, AutoTokenizer.from_pretrained(base), 4, 64).tokens
    model_ = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.inference_mode():
        reference = model_(tokens).logits.log_softmax(-1)
        model_.load_state_dict(dequantized_state_dict(tmp_path / "awq"))
        quantized = model_(tokens).logits.log_softmax(-1)
    kl = float((reference.exp() * (reference - quantized)).sum(-1).mean())
    assert kl < 0.05, kl


def test_patterns_are_checked_before_any_work(tmp_path, model):
    base, calib = model
    config = read_model_config(base)
    with pytest.raises(MergeqError, match=r"--exclude 'mlp\\.nothing' matches none") as caught:
        resolve(config, (r"mlp\.nothing",))
    assert "model.layers.0.mlp.down_proj" in caught.value.hint
    with pytest.raises(MergeqError, match="not a regular expression"):
        resolve(config, ("(",))
    with pytest.raises(MergeqError, match=r"keeps model\.layers\.1\.self_attn\.q_proj in fp16 but not .*k_proj"):
        resolve(config, (r"layers\.1\.self_attn\.q_proj",))
    with pytest.raises(MergeqError, match=r"gate_up_proj"):
        resolve(config, (r"up_proj",))
    with pytest.raises(MergeqError, match="lm_head|matches none"):
        resolve(config, ("lm_head",))
    # refused at preflight: no output folder is made
    with pytest.raises(MergeqError, match="matches none"):
        export_int4(base, tmp_path / "out", _options("gptq", calib, exclude=("nothing",)))
    assert not (tmp_path / "out").exists()
    assert resolve(config, (r"self_attn\.[qkv]_proj", r"\.0\.mlp\.down")).names == tuple(
        sorted(
            [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"] + ["model.layers.0.mlp.down_proj"]
        )
    )


def test_the_option_reaches_the_cli_and_toml(tmp_path, model):
    from mergeq.cli import main

    base, calib = model
    out = tmp_path / "cli"
    code = main(
        ["-q", "export", "gptq", "--model", str(base), "--out", str(out), "--calib", str(calib)]
        + ["--samples", "4", "--seq-len", "32", "--group-size", "32", "--no-eval"]
        + ["--exclude", r"layers\.0\.mlp\.down_proj", "--exclude", r"layers\.1\.mlp\.down_proj"]
    )
    assert code == 0
    linears, _ = read_quantized(out)
    assert "model.layers.0.mlp.down_proj" not in linears and "model.layers.1.mlp.down_proj" not in linears
    assert "model.layers.0.mlp.up_proj" in linears
    from exporters.int4.options import GptqOptions
    from mergeq.core.options import from_table

    problems = []
    table = {"calib": str(calib), "exclude": [r"down_proj$", r"o_proj$"]}
    options = from_table(GptqOptions, table, problem=lambda key, message: problems.append((key, message)))
    assert not problems and options.exclude == (r"down_proj$", r"o_proj$")
