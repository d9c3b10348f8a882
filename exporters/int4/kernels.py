"""Preflight for int4 exports: every check that needs only config.json and tensor shapes, run before any
calibration, and a prediction of the kernel vLLM will pick for each linear at tensor-parallel sizes 1, 2,
4 and 8.

The kernel rules follow vLLM's own checks (as read in vllm/model_executor/layers/quantization):
- Marlin (gptq_marlin, awq_marlin, compressed-tensors WNA16): group size in {-1, 32, 64, 128}; per
  partition out_features % 64 == 0, in_features % 128 == 0, and in_features % group_size == 0 when the
  group is smaller than the whole input. gptq_marlin takes only symmetric GPTQ (uint4b8); awq_marlin
  takes AWQ's zero points.
- Where Marlin cannot take a layer: gptq_marlin falls back to the Exllama kernel (float16 activations,
  full in_features % group_size == 0, out % 8 == 0, no act-order when the input is split); awq_marlin to
  the AWQ GEMM kernel (in % group == 0, out % 8 == 0); asymmetric GPTQ always uses the gptq (Exllama) path
  with the same two conditions; asymmetric compressed-tensors has no fallback.
- vLLM splits q/k/v and gate/up outputs (column parallel, fused as qkv_proj and gate_up_proj) and o/down
  inputs (row parallel); attention heads must divide by the TP size.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporters.int4.arch import Architecture
from exporters.int4.quant import QuantScheme
from mergeq.errors import MergeqError

TP_SIZES = (1, 2, 4, 8)
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_MIN_N = 64  # out_features per partition
MARLIN_MIN_K = 128  # in_features per partition


@dataclass(frozen=True)
class LinearShape:
    name: str  # e.g. "self_attn.q_proj" (the same in every layer)
    in_features: int
    out_features: int


def linear_shapes(config: dict, arch: Architecture) -> list[LinearShape]:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    outs = {
        "self_attn.q_proj": (hidden, heads * head_dim),
        "self_attn.k_proj": (hidden, kv_heads * head_dim),
        "self_attn.v_proj": (hidden, kv_heads * head_dim),
        "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    return [LinearShape(name, *outs[name]) for name in arch.linears]


def check_group_size(shapes: list[LinearShape], scheme: QuantScheme, layers: int) -> None:
    if scheme.group_size == -1:
        return
    bad = [s for s in shapes if s.in_features % scheme.group_size]
    if not bad:
        return
    fits = [g for g in (128, 64, 32) if all(s.in_features % g == 0 for s in shapes)]
    listing = ", ".join(f"model.layers.[0-{layers - 1}].{s.name} (in_features {s.in_features})" for s in bad)
    hint = (f"use --group-size {fits[0]}" if fits else "use --group-size -1 (one group per output channel)")
    raise MergeqError(f"--group-size {scheme.group_size} does not divide the in_features of {listing}", hint=hint)


def check_packing(shapes: list[LinearShape], layout, layers: int, fmt_name: str) -> None:
    bad = [s for s in shapes if s.in_features % layout.in_multiple or s.out_features % layout.out_multiple]
    if bad:
        listing = ", ".join(f"model.layers.[0-{layers - 1}].{s.name} ({s.out_features}x{s.in_features})" for s in bad)
        raise MergeqError(
            f"the {fmt_name} format packs 32-bit words: it needs in_features % {layout.in_multiple} == 0 and "
            f"out_features % {layout.out_multiple} == 0, which {listing} break",
            hint="choose another --format, or leave this model unquantized",
        )


# vLLM's fused modules: which of our linears share one parallel layer, and how it is split.
_FUSED = {
    "qkv_proj": ("column", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "o_proj": ("row", ("self_attn.o_proj",)),
    "gate_up_proj": ("column", ("mlp.gate_proj", "mlp.up_proj")),
    "down_proj": ("row", ("mlp.down_proj",)),
}


def vllm_method(fmt_name: str, scheme: QuantScheme) -> str:
    """The quantization method vLLM selects for the whole checkpoint."""
    marlin_group = scheme.group_size in MARLIN_GROUP_SIZES
    if fmt_name == "gptq":
        return "gptq_marlin" if (scheme.sym and scheme.bits in (4, 8) and marlin_group) else "gptq"
    if fmt_name == "awq":
        return "awq_marlin" if (scheme.bits == 4 and marlin_group) else "awq"
    return "compressed-tensors"


def _marlin_shape_problem(out_part: int, in_part: int, in_full: int, group: int) -> str | None:
    if out_part % MARLIN_MIN_N:
        return f"out_features per partition {out_part} is not a multiple of {MARLIN_MIN_N}"
    if in_part % MARLIN_MIN_K:
        return f"in_features per partition {in_part} is not a multiple of {MARLIN_MIN_K}"
    if group != -1 and group < in_full and in_part % group:
        return f"in_features per partition {in_part} is not a multiple of the group size {group}"
    return None


def _partition(config: dict, shapes: dict[str, LinearShape], fused: str, tp: int) -> tuple[int, int, int, str | None]:
    """(out per partition, in per partition, full in, problem) of a fused vLLM layer at TP size `tp`."""
    split, members = _FUSED[fused]
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if split == "row":
        shape = shapes[members[0]]
        if shape.in_features % tp:
            return 0, 0, 0, f"in_features {shape.in_features} is not divisible by tensor parallel size {tp}"
        return shape.out_features, shape.in_features // tp, shape.in_features, None
    out = 0
    for name in members:
        shape = shapes[name]
        if name in ("self_attn.k_proj", "self_attn.v_proj"):
            head_dim = shape.out_features // kv_heads
            out += max(1, kv_heads // tp) * head_dim
        else:
            if shape.out_features % tp:
                return 0, 0, 0, f"{name} out_features {shape.out_features} is not divisible by {tp}"
            out += shape.out_features // tp
    in_full = shapes[members[0]].in_features
    return out, in_full, in_full, None


def model_problem(config: dict, tp: int) -> str | None:
    """Why vLLM cannot split this model over `tp` GPUs at all, if it cannot."""
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if heads % tp:
        return f"{heads} attention heads are not divisible by tensor parallel size {tp}"
    if (kv_heads >= tp and kv_heads % tp) or (kv_heads < tp and tp % kv_heads):
        return f"{kv_heads} key/value heads do not split over tensor parallel size {tp}"
    return None


def predict_kernels(config: dict, arch: Architecture, fmt_name: str, scheme: QuantScheme, desc_act: bool) -> dict:
    """{"method": ..., "tp": {"1": {"ok": bool, "kernels": {fused layer: kernel}, "problems": [...]}, ...}}.

    Kernels: "marlin", "exllama" (gptq/Exllama), "awq_gemm", or "none" (vLLM refuses to load)."""
    shapes = {s.name: s for s in linear_shapes(config, arch)}
    method = vllm_method(fmt_name, scheme)
    group = scheme.group_size
    result = {"method": method, "tp": {}}
    for tp in TP_SIZES:
        kernels: dict[str, str] = {}
        problems: list[str] = []
        if (whole := model_problem(config, tp)) is not None:
            result["tp"][str(tp)] = {"ok": False, "kernels": {}, "problems": [whole]}
            continue
        for fused, (split, _) in _FUSED.items():
            out_part, in_part, in_full, problem = _partition(config, shapes, fused, tp)
            if problem:
                kernels[fused] = "none"
                problems.append(f"{fused}: {problem}")
                continue
            row_split = split == "row" and tp > 1
            marlin = _marlin_shape_problem(out_part, in_part, in_full, group)
            gemm_ok = (group == -1 or in_part % group == 0) and out_part % (32 // scheme.bits) == 0
            if method in ("gptq_marlin", "awq_marlin") or (method == "compressed-tensors"):
                if marlin is None and group in MARLIN_GROUP_SIZES:
                    kernels[fused] = "marlin"
                    continue
            if method == "gptq_marlin" or (method == "compressed-tensors" and scheme.sym) or method == "gptq":
                exllama_ok = (group == -1 or in_full % group == 0) and gemm_ok and not (desc_act and row_split)
                if exllama_ok:
                    kernels[fused] = "exllama"
                    if method != "gptq":
                        problems.append(f"{fused}: Marlin cannot take it ({marlin}); Exllama needs float16 activations")
                    continue
            elif method in ("awq_marlin", "awq") and gemm_ok:
                kernels[fused] = "awq_gemm"
                problems.append(f"{fused}: Marlin cannot take it ({marlin}); unoptimized AWQ GEMM kernel")
                continue
            kernels[fused] = "none"
            problems.append(f"{fused}: no vLLM kernel takes out {out_part} x in {in_part} per partition"
                            + (f" ({marlin})" if marlin else ""))
        result["tp"][str(tp)] = {"ok": all(k != "none" for k in kernels.values()), "kernels": kernels,
                                 "problems": problems}
    return result


def summarize(prediction: dict) -> dict[str, str]:
    """TP size -> one line, e.g. "gptq_marlin: marlin x2, exllama x2" or "fails: ..."."""
    lines = {}
    for tp, entry in prediction["tp"].items():
        if not entry["ok"]:
            fatal = [p for p in entry["problems"] if "no vLLM kernel" in p] or entry["problems"]
            lines[tp] = "fails: " + "; ".join(fatal)
            continue
        counts: dict[str, int] = {}
        for kernel in entry["kernels"].values():
            counts[kernel] = counts.get(kernel, 0) + 1
        lines[tp] = f"{prediction['method']}: " + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))
    return lines
