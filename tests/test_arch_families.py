"""The int4 exporters on the families people fine-tune beyond Llama: Qwen3, Gemma 2 and 3 (sliding and global layers),
Phi-3 (fused qkv_proj and gate_up_proj), OLMo 2 (post-norms), Mixtral and Qwen3-MoE (experts), each a tiny
random model built here from its transformers config.

For every family: GPTQ, AWQ and RTN export; the checkpoint keeps the original tensor names (those vLLM's model
files load: vllm/model_executor/models/{qwen3,gemma3,phi3,olmo2,mixtral,qwen3_moe}.py, per-expert
`experts.E.<gate|up|down>` for MoE); routers and norms stay in full precision; the layer-wise output error of
GPTQ and of AWQ is below RTN's on the same calibration batch; evaluation through the pipeline's loader gives a
finite perplexity. An MoE model whose calibration cannot reach every expert reports those experts and rounds
them to nearest. A family without an AWQ map is refused by AWQ and works with GPTQ. A wrong fold map is caught.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from int4_models import MORE_FAMILIES, calibration_text, options_for, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

from exporters.int4 import families
from exporters.int4.calibration import load_calibration
from exporters.int4.export import export_int4
from exporters.int4.formats import dequantized_state_dict, read_quantized
from exporters.int4.quant import QuantScheme, rtn_quantize
from mergeq.core.errors import MergeqError

FAMILIES = list(MORE_FAMILIES)
SAMPLES, SEQ_LEN, GROUP = 8, 64, 32
# the quantized linears of decoder layer 0, as the checkpoint (and vLLM) names them
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPECTED = {
    "qwen3": ATTENTION + DENSE_MLP,
    "gemma2": ATTENTION + DENSE_MLP,
    "gemma3": ATTENTION + DENSE_MLP,
    "olmo2": ATTENTION + DENSE_MLP,
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "mixtral": ATTENTION + tuple(f"block_sparse_moe.experts.{e}.{w}" for e in range(4) for w in ("w1", "w2", "w3")),
    "qwen3_moe": ATTENTION + tuple(f"mlp.experts.{e}.{w}_proj" for e in range(4) for w in ("gate", "up", "down")),
}
ROUTERS = {"mixtral": "block_sparse_moe.gate.weight", "qwen3_moe": "mlp.gate.weight"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    calibration_text(root / "calib.txt")
    return root


_exports: dict[tuple, Path] = {}


def exported(work: Path, family: str, method: str, fmt: str = "native") -> tuple[Path, Path, object]:
    """(base, output, report) of one export, made once per module."""
    base = work / f"base-{family}"
    if not base.exists():
        tiny_model(base, family)
    key = (family, method, fmt)
    out = work / f"{family}-{method}-{fmt}"
    if key not in _exports:
        report = export_int4(
            base,
            out,
            options_for(
                method,
                calib=work / "calib.txt",
                samples=SAMPLES,
                seq_len=SEQ_LEN,
                group_size=GROUP,
                device="cpu",
                format=fmt,
            ),
        )
        _exports[key] = report
    return base, out, _exports[key]


def _names(folder: Path) -> set[str]:
    names = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            names.update(handle.keys())
    return names


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_export_keeps_the_checkpoint_names(work, family, method):
    base, out, report = exported(work, family, method)
    linears, plain = read_quantized(out)
    layer0 = sorted(name[len("model.layers.0.") :] for name in linears if name.startswith("model.layers.0."))
    assert layer0 == sorted(EXPECTED[family])
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert len(linears) == layers * len(EXPECTED[family])
    # every tensor of the original checkpoint is there under its own name, quantized or copied
    rebuilt = (
        set(plain)
        | {f"{name}.weight" for name in linears}
        | {f"{n}.bias" for n, q in linears.items() if q.bias is not None}
    )
    assert rebuilt == _names(base)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == ("awq" if method == "awq" else "gptq")
    with safe_open(next(base.glob("*.safetensors")), "pt") as handle:
        for name, tensor in plain.items():  # copied as they were (fp16 in, fp16 out), routers included
            if method != "awq" or "layers" not in name:  # AWQ folds scales into norms and routers
                assert torch.equal(tensor, handle.get_tensor(name)), name
    routers = {n for n in plain if n.endswith(ROUTERS.get(family, "-"))}
    assert len(routers) == (2 if family in ROUTERS else 0)
    if method == "awq" and family == "olmo2":
        assert any("post-norm" in w for w in report.warnings)


def _hf_model(folder: Path, state: dict | None = None):
    """A float32 transformers model of `folder`, or of its config with `state` (names as on disk), loaded through
    transformers' own checkpoint conversion (MoE experts are fused on load)."""
    from transformers import AutoModelForCausalLM

    if state is not None:
        target = folder.parent / (folder.name + "-dequantized")
        target.mkdir(exist_ok=True)
        config = json.loads((folder / "config.json").read_text())
        config.pop("quantization_config", None)
        (target / "config.json").write_text(json.dumps(config))
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
        folder = target
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def layer_errors(base: Path, outs: dict[str, Path], tokens: torch.Tensor) -> dict[str, list[float]]:
    """Per method, per decoder layer: ||layer_q(x) - layer(x)||^2 with x the float model's input to that layer."""
    reference = _hf_model(base)
    layers = reference.model.layers
    calls: list[tuple] = [None] * len(layers)
    handles = []
    for i, layer in enumerate(layers):

        def pre(_m, args, kwargs, i=i):
            calls[i] = (args, kwargs)

        def post(_m, _args, _kwargs, output, i=i):
            calls[i] = calls[i] + (output[0] if isinstance(output, tuple) else output,)

        handles += [
            layer.register_forward_pre_hook(pre, with_kwargs=True),
            layer.register_forward_hook(post, with_kwargs=True),
        ]
    with torch.inference_mode():
        reference(input_ids=tokens, use_cache=False)
    for handle in handles:
        handle.remove()
    errors = {}
    for method, out in outs.items():
        model = _hf_model(out, dequantized_state_dict(out, torch.float32))
        errors[method] = []
        with torch.inference_mode():
            for i, (args, kwargs, expected) in enumerate(calls):
                got = model.model.layers[i](*args, **kwargs)
                got = got[0] if isinstance(got, tuple) else got
                errors[method].append(float((got - expected).square().sum()))
    return errors


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_and_awq_beat_rtn_layer_by_layer(work, family):
    from transformers import AutoTokenizer

    outs = {method: exported(work, family, method)[1] for method in ("rtn", "gptq", "awq")}
    base = work / f"base-{family}"
    tokens = load_calibration(work / "calib.txt", AutoTokenizer.from_pretrained(base), SAMPLES, SEQ_LEN).tokens
    errors = layer_errors(base, outs, tokens)
    for method in ("gptq", "awq"):
        assert sum(errors[method]) < sum(errors["rtn"]), (method, errors)
        assert errors[method][0] < errors["rtn"][0], (method, errors)  # layer 0 sees the same input in all three


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_gives_finite_perplexity(work, family):
    from exporters.eval_torch import load_torch_model

    base, out, _ = exported(work, family, "gptq")
    model = load_torch_model(out, "int4")
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        loss = float(model(input_ids=tokens, labels=tokens).loss)
    assert math.isfinite(loss) and 0 < loss < 20, loss
    reference = _hf_model(base)
    with torch.inference_mode():
        float_loss = float(reference(input_ids=tokens, labels=tokens).loss)
    assert abs(loss - float_loss) < 0.5, (loss, float_loss)  # the int4 model is the same model, rounded


def _idle_experts(warning: str) -> list[int]:
    return json.loads(warning.split("experts ", 1)[1].split(" received")[0])


def test_moe_experts_without_calibration_tokens_are_reported_and_rounded(tmp_path):
    """8 experts, one per token, 4 calibration tokens: at least 4 experts per layer receive nothing."""
    base = tiny_model(tmp_path / "base", "mixtral", overrides={"num_local_experts": 8, "num_experts_per_tok": 1})
    calib = tmp_path / "calib.txt"
    calib.write_text("abcd")
    for method in ("gptq", "awq"):
        out = tmp_path / method
        report = export_int4(
            base, out, options_for(method, calib=calib, samples=1, seq_len=4, group_size=32, device="cpu")
        )
        idle_warnings = [w for w in report.warnings if "received no calibration tokens" in w]
        assert len(idle_warnings) == 2, report.warnings  # one per layer
        linears, plain = read_quantized(out)
        with safe_open(base / "model.safetensors", "pt") as handle:
            for layer, warning in enumerate(idle_warnings):
                idle = _idle_experts(warning)
                assert 4 <= len(idle) < 8
                for e in idle:
                    for w in ("w1", "w2", "w3"):
                        name = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"
                        assert name in linears
                        if method == "gptq":  # rounded to nearest from the original weights (AWQ's shared input
                            # scale is folded into every expert first)
                            original = handle.get_tensor(f"{name}.weight").float()
                            expected = rtn_quantize(original, QuantScheme(4, 32, True))
                            assert torch.equal(linears[name].codes, expected.codes), name
                busy = next(e for e in range(8) if e not in idle)
                name = f"model.layers.{layer}.block_sparse_moe.experts.{busy}.w2"
                original = handle.get_tensor(f"{name}.weight").float()
                rounded = rtn_quantize(original, QuantScheme(4, 32, method == "gptq"))
                assert not torch.equal(linears[name].codes, rounded.codes), name  # calibrated, not merely rounded
                router = f"model.layers.{layer}.block_sparse_moe.gate"
                assert router not in linears and f"{router}.weight" in plain  # the router stays in full precision
                if method == "gptq":
                    assert torch.equal(plain[f"{router}.weight"], handle.get_tensor(f"{router}.weight"))


def test_family_without_awq_map_gptq_works_awq_refuses(tmp_path):
    """Starcoder2 (biased, non-gated MLP c_fc/c_proj) has no entry: GPTQ quantizes every linear, AWQ refuses."""
    base = tiny_model(tmp_path / "base", "starcoder2")
    calib = calibration_text(tmp_path / "calib.txt")
    options = {"calib": calib, "samples": 4, "seq_len": 32, "group_size": 32, "device": "cpu"}
    with pytest.raises(MergeqError, match="AWQ has no scale-fold map") as refused:
        export_int4(base, tmp_path / "awq", options_for("awq", **options))
    assert "GPTQ" in str(refused.value.hint)
    assert not (tmp_path / "awq").exists()
    export_int4(base, tmp_path / "gptq", options_for("gptq", **options))
    linears, _ = read_quantized(tmp_path / "gptq")
    assert sorted(n[len("model.layers.0.") :] for n in linears if n.startswith("model.layers.0.")) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.c_fc", "mlp.c_proj"]
    )
    assert all(q.bias is not None for q in linears.values())


def test_a_wrong_fold_map_is_caught(tmp_path, monkeypatch):
    """Folding Gemma's x*(1+w) norms as if they computed x*w changes the layer: the engine refuses."""
    base = tiny_model(tmp_path / "base", "gemma3")
    calib = calibration_text(tmp_path / "calib.txt")
    wrong = tuple(
        families.Fold(f.group, f.into, "norm" if f.kind == "norm_plus_one" else f.kind, f.chunks)
        for f in families.GEMMA_FOLDS
    )
    entries = tuple(
        families.Family(f.name, f.architectures, wrong) if f.name == "gemma3" else f for f in families.FAMILIES
    )
    monkeypatch.setattr(families, "FAMILIES", entries)
    with pytest.raises(MergeqError, match="fold map .* is wrong"):
        export_int4(
            base, tmp_path / "awq", options_for("awq", calib=calib, samples=4, seq_len=32, group_size=32, device="cpu")
        )
    assert not (tmp_path / "awq").exists()


def test_kernel_prediction_covers_fused_projections_and_experts():
    """Phi-3's fused qkv_proj/gate_up_proj are vLLM's fused layers as they are; a MoE model's experts are one fused-MoE
    layer: Marlin MoE while the intermediate size per TP partition is a whole number of groups (Qwen3-30B-A3B's 768 at
    group 128: TP 1 and 2), MoE WNA16 beyond (TP 4: 192 per partition)."""
    from exporters.int4 import kernels

    scheme = QuantScheme(4, 128, True)
    phi3 = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "num_hidden_layers": 2,
        "vocab_size": 32064,
    }
    names = {s.name for s in kernels.linear_shapes(phi3)}
    assert names == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
    predicted = kernels.predict_kernels(phi3, "gptq", scheme, False)
    assert predicted["tp"]["1"]["kernels"] == dict.fromkeys(
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "machete"
    )
    moe = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_hidden_layers": 2,
        "vocab_size": 151936,
    }
    shapes = {s.name: (s.in_features, s.out_features) for s in kernels.linear_shapes(moe)}
    assert shapes["mlp.experts.w13"] == (2048, 1536) and shapes["mlp.experts.w2"] == (768, 2048)
    assert not any("gate" == name.rpartition(".")[2] for name in shapes)  # the router is not quantized
    predicted = kernels.predict_kernels(moe, "gptq", scheme, False)
    experts = {tp: predicted["tp"][tp]["kernels"]["experts"] for tp in ("1", "2", "4", "8")}
    assert experts == {"1": "marlin_moe", "2": "marlin_moe", "4": "moe_wna16", "8": "moe_wna16"}
    assert any("experts on sm90: moe_wna16" in p for p in predicted["tp"]["4"]["problems"])
