"""Preflight for int4 exports: every check that needs only config.json and tensor shapes, run before any
calibration, and a prediction of the kernel vLLM will pick for each linear at tensor-parallel sizes 1, 2,
4 and 8 on each GPU generation.

The rules follow vLLM 0.32 (vllm/model_executor/layers/quantization/auto_gptq.py, auto_awq.py,
compressed_tensors, and vllm/model_executor/kernels/linear/mixed_precision), and
tests/test_int4_kernels_vllm.py checks them against vLLM's own code for every layer:
- The checkpoint: GPTQ loads as auto_gptq, which takes only symmetric 4/8-bit codes, no activation-order
  groups (desc_act with a group size) and, on every GPU, a Marlin group size {-1, 32, 64, 128}. AWQ loads as
  auto_awq (4 bits). compressed-tensors pack-quantized takes symmetric or asymmetric codes. All three need
  compute capability 7.5 or more.
- Each layer: vLLM tries its kernels in order and takes the first that can: Machete (Hopper, exactly SM 9.0:
  group size -1/64/128, in_features per partition % 64 == 0, out_features per partition % 128 == 0), then
  Marlin (SM 7.5+: group size -1/32/64/128 and no group straddling a TP split; tile misalignment is padded
  since vLLM 0.2x, so in % 128 and out % 64 no longer matter), then Exllama (SM 6.0+, symmetric, float16,
  whole in_features % group == 0, out % 8 == 0), then Triton W4A16 (N % 8 == 0, group -1/32/64/128/256 or the
  whole K, K % group == 0). Conch (SM 8.0+, group -1/128) runs only with the separate conch-triton-kernels
  package, which vLLM does not install; it is left out. AWQ layers go through that list only where Marlin
  supports the layer; elsewhere they get the unoptimized AWQ GEMM kernel (in % group == 0, out % 8 == 0).
  compressed-tensors refuses a layer whose input split cuts a quantization group, whatever the kernel.
- vLLM splits q/k/v and gate/up outputs (column parallel, fused as qkv_proj and gate_up_proj) and o/down
  inputs (row parallel); attention heads must divide by the TP size; key/value heads are split or
  replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporters.int4.quant import QuantScheme
from mergeq.core.errors import MergeqError
from mergeq.core.skeleton import decoder_layers

VLLM_VERSION = "0.32"  # the vLLM whose rules these are (the `vllm` peer environment of tests/peer_env.py)
TP_SIZES = (1, 2, 4, 8)
# GPU generations by CUDA compute capability: Hopper (H100/H200), Ampere/Ada (A100, A10, L4, RTX 30/40), Turing (T4)
GPUS = {"sm90": 90, "sm80": 80, "sm75": 75}
FASTEST_GPU = "sm90"
FORMAT_MIN_CAPABILITY = 75  # auto_gptq (through its Marlin check), auto_awq and compressed-tensors WNA16
# the lowest compute capability each kernel runs on (Machete runs on SM 9.0 only)
KERNEL_MIN_CAPABILITY = {"machete": 90, "marlin": 75, "exllama": 60, "triton_w4a16": 0, "awq_gemm": 75}
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MACHETE_GROUP_SIZES = (-1, 64, 128)  # with float16/bfloat16 activations
MACHETE_IN_MULTIPLE = 64  # in_features per partition
MACHETE_OUT_MULTIPLE = 128  # out_features per partition
TRITON_GROUP_SIZES = (-1, 32, 64, 128, 256)


@dataclass(frozen=True)
class LinearShape:
    name: str  # e.g. "self_attn.q_proj" (the same in every layer)
    in_features: int
    out_features: int


def linear_shapes(config: dict) -> list[LinearShape]:
    """The shape of every matrix the engine quantizes in the decoder layers, from a meta-device build of the
    model transformers defines for config.json: each linear (routers and gates excluded), and for a MoE
    family each expert's fused gate/up rows ("<experts>.w13", [2I, H]) and down matrix ("<experts>.w2").
    Shapes that differ between layers (dense and sparse layers) are each listed once."""
    from exporters.int4.families import family_of, quantized_linears

    family = family_of(config)
    _, layers = decoder_layers(meta_model(config))
    experts = family.experts.module if family.experts else None
    shapes: dict[tuple[str, int, int], LinearShape] = {}
    for layer in layers:
        linears = quantized_linears(layer, family)
        for name, module in layer.named_modules():
            if experts and name == experts:
                inter, hidden = module.down_proj.shape[-1], module.gate_up_proj.shape[-1]
                for shape in (LinearShape(f"{name}.w13", hidden, 2 * inter), LinearShape(f"{name}.w2", inter, hidden)):
                    shapes.setdefault((shape.name, shape.in_features, shape.out_features), shape)
            elif name in linears:
                key = (name, module.in_features, module.out_features)
                shapes.setdefault(key, LinearShape(name, module.in_features, module.out_features))
    return list(shapes.values())


def meta_model(config: dict):
    """transformers' model for a config.json dict, on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type is None:  # a config.json without model_type: the one its architecture class belongs to
        by_class = {cls: kind for kind, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
        model_type = next((by_class[a] for a in config.get("architectures") or [] if a in by_class), None)
    values = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type")}
    try:
        hf_config = AutoConfig.for_model(model_type, **values)
    except (KeyError, ValueError) as exc:
        raise MergeqError(
            f"transformers does not know model_type {model_type!r}: {exc}",
            hint="upgrade transformers, or leave this model unquantized",
        ) from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)


def check_group_size(shapes: list[LinearShape], scheme: QuantScheme, layers: int) -> None:
    if scheme.group_size == -1:
        return
    bad = [s for s in shapes if s.in_features % scheme.group_size]
    if not bad:
        return
    fits = [g for g in (128, 64, 32) if all(s.in_features % g == 0 for s in shapes)]
    listing = ", ".join(f"model.layers.[0-{layers - 1}].{s.name} (in_features {s.in_features})" for s in bad)
    hint = f"use --group-size {fits[0]}" if fits else "use --group-size -1 (one group per output channel)"
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


# vLLM's fused parallel layers: name -> (split, the sets of our linears that may form it, first match wins)
_FUSED = {
    "qkv_proj": ("column", (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.qkv_proj",))),
    "o_proj": ("row", (("self_attn.o_proj",),)),
    "gate_up_proj": ("column", (("mlp.gate_proj", "mlp.up_proj"), ("mlp.gate_up_proj",))),
    "down_proj": ("row", (("mlp.down_proj",),)),
}
EXPERT_SUFFIXES = (".w13", ".w2")  # linear_shapes' names for an experts module's matrices
MOE_MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MOE_MARLIN_HIDDEN_MULTIPLE = 128


def fused_layers(shapes: dict[str, LinearShape]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """vLLM layer -> (split, members) for the linears present. A linear outside vLLM's usual fusions is
    predicted as its own column-parallel layer; expert matrices are predicted by `expert_kernel`."""
    layers, used = {}, set()
    for fused, (split, choices) in _FUSED.items():
        for members in choices:
            if all(m in shapes for m in members):
                layers[fused] = (split, members)
                used |= set(members)
                break
    for name in shapes:
        if name not in used and not name.endswith(EXPERT_SUFFIXES):
            layers[name] = ("column", (name,))
    return layers


def expert_kernel(
    config: dict, shapes: dict[str, LinearShape], scheme: QuantScheme, tp: int, cc: int
) -> tuple[str, str | None]:
    """vLLM's fused-MoE kernel for the experts (check_moe_marlin_supports_config with tile padding, as
    auto_gptq, auto_awq and compressed-tensors WNA16 call it): Marlin MoE when the hidden size is a multiple
    of 128, the group size is Marlin's and the intermediate size per TP partition is a whole number of
    groups; otherwise the MoE WNA16 Triton kernels."""
    w2 = next(s for name, s in shapes.items() if name.endswith(".w2"))
    hidden, inter = w2.out_features, w2.in_features
    if inter % tp:
        return "none", f"expert intermediate size {inter} is not divisible by tensor parallel size {tp}"
    part = inter // tp
    why = None
    if cc < KERNEL_MIN_CAPABILITY["marlin"]:
        why = "Marlin MoE needs compute capability 7.5"
    elif scheme.group_size not in MOE_MARLIN_GROUP_SIZES:
        why = f"group size {scheme.group_size} is not one of Marlin MoE's {MOE_MARLIN_GROUP_SIZES}"
    elif hidden % MOE_MARLIN_HIDDEN_MULTIPLE:
        why = f"hidden size {hidden} is not a multiple of {MOE_MARLIN_HIDDEN_MULTIPLE}"
    elif scheme.group_size > 0 and part % scheme.group_size:
        why = f"expert intermediate size per partition {part} is not a multiple of the group size"
    return ("marlin_moe", None) if why is None else ("moe_wna16", why)


def vllm_method(fmt_name: str, scheme: QuantScheme) -> str:
    """The quantization method vLLM 0.32 loads the checkpoint with (whatever alias --quantization names)."""
    return {"gptq": "auto_gptq", "awq": "auto_awq"}.get(fmt_name, "compressed-tensors")


def refusal(fmt_name: str, scheme: QuantScheme, desc_act: bool) -> str | None:
    """Why vLLM refuses the checkpoint on every GPU, whatever the shapes; None if it does not."""
    if fmt_name == "gptq":
        if not scheme.sym or scheme.bits not in (4, 8):
            return (
                f"vLLM {VLLM_VERSION} loads only symmetric 4- or 8-bit GPTQ (auto_gptq); this is "
                f"{'a' if scheme.sym else 'an a'}symmetric {scheme.bits}-bit checkpoint"
            )
        if desc_act and scheme.group_size != -1:
            return f"vLLM {VLLM_VERSION} no longer loads GPTQ with activation-order groups (desc_act)"
        if scheme.group_size not in MARLIN_GROUP_SIZES:
            return f"auto_gptq checks Marlin's group sizes {MARLIN_GROUP_SIZES} for every layer: {scheme.group_size}"
    if fmt_name == "awq" and scheme.bits != 4:
        return f"vLLM's AWQ loader takes 4-bit weights only, not {scheme.bits}"
    return None


def _partition(
    config: dict, shapes: dict[str, LinearShape], split: str, members: tuple[str, ...], tp: int
) -> tuple[int, int, int, str | None]:
    """(out per partition, in per partition, full in, problem) of a fused vLLM layer at TP size `tp`."""
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
        elif name == "self_attn.qkv_proj":  # q, then k and v of kv_heads heads each (Phi-3)
            head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
            out += heads // tp * head_dim + 2 * max(1, kv_heads // tp) * head_dim
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


@dataclass(frozen=True)
class _Layer:
    out_part: int
    in_part: int
    in_full: int
    group: int
    bits: int
    zero_points: bool  # asymmetric codes (AWQ, asymmetric compressed-tensors)


def _no_straddle(layer: _Layer) -> bool:
    """No quantization group crosses a TP split of the input (Marlin's only shape condition)."""
    g = layer.group
    return g == -1 or g >= layer.in_full or layer.in_part % g == 0


def _machete(layer: _Layer, cc: int) -> str | None:
    if cc != 90:
        return "Machete runs on compute capability 9.0 only"
    if layer.group not in MACHETE_GROUP_SIZES:
        return f"group size {layer.group} is not one of Machete's {MACHETE_GROUP_SIZES}"
    if layer.in_part % MACHETE_IN_MULTIPLE:
        return f"in_features per partition {layer.in_part} is not a multiple of {MACHETE_IN_MULTIPLE}"
    if layer.out_part % MACHETE_OUT_MULTIPLE:
        return f"out_features per partition {layer.out_part} is not a multiple of {MACHETE_OUT_MULTIPLE}"
    return None


def _marlin(layer: _Layer, cc: int) -> str | None:
    if cc < KERNEL_MIN_CAPABILITY["marlin"]:
        return "Marlin needs compute capability 7.5"
    if layer.zero_points and layer.bits != 4:
        return "Marlin takes zero points with 4-bit codes only"
    if layer.group not in MARLIN_GROUP_SIZES:
        return f"group size {layer.group} is not one of Marlin's {MARLIN_GROUP_SIZES}"
    if not _no_straddle(layer):
        return f"in_features per partition {layer.in_part} is not a multiple of the group size {layer.group}"
    return None


def _exllama(layer: _Layer, cc: int) -> str | None:
    if layer.zero_points:
        return "Exllama takes symmetric codes only"
    if layer.group <= 0 or layer.in_full % layer.group:
        return f"Exllama needs a group size that divides in_features {layer.in_full}"
    if layer.out_part % (32 // layer.bits):
        return f"out_features per partition {layer.out_part} is not a multiple of {32 // layer.bits}"
    return None


def _triton(layer: _Layer, cc: int) -> str | None:
    if layer.bits != 4:
        return "Triton W4A16 takes 4-bit codes only"
    if layer.out_part % 8:
        return f"out_features per partition {layer.out_part} is not a multiple of 8"
    if layer.group not in TRITON_GROUP_SIZES and layer.group != layer.in_full:
        return f"group size {layer.group} is not one of Triton W4A16's {TRITON_GROUP_SIZES}"
    effective = layer.in_part if layer.group == -1 else layer.group
    if layer.in_part % effective:
        return f"in_features per partition {layer.in_part} is not a multiple of the group size {layer.group}"
    return None


# vLLM's choose_mp_linear_kernel order on CUDA (CUTLASS W4A8 needs fp8 activations; Conch and Humming need
# packages vLLM does not install)
_MP_KERNELS = (("machete", _machete), ("marlin", _marlin), ("exllama", _exllama), ("triton_w4a16", _triton))


def _awq_gemm(layer: _Layer) -> str | None:
    group = layer.group if layer.group != -1 else layer.in_full
    if layer.in_part % group:
        return f"in_features per partition {layer.in_part} is not a multiple of the group size {group}"
    if layer.out_part % (32 // layer.bits):
        return f"out_features per partition {layer.out_part} is not a multiple of {32 // layer.bits}"
    return None


def layer_kernel(fmt_name: str, layer: _Layer, cc: int) -> tuple[str, str | None]:
    """(kernel, why the faster ones could not take it) for one layer on a GPU of compute capability `cc`."""
    if cc < FORMAT_MIN_CAPABILITY:
        return "none", f"vLLM's {fmt_name} loader needs compute capability {FORMAT_MIN_CAPABILITY / 10:.1f}"
    reasons = []
    if fmt_name == "awq" and (why := _marlin(layer, cc)) is not None:
        if (gemm := _awq_gemm(layer)) is None:
            return "awq_gemm", f"Marlin cannot take it ({why}); unoptimized AWQ GEMM kernel"
        return "none", f"Marlin cannot take it ({why}), nor the AWQ GEMM kernel ({gemm})"
    if fmt_name == "compressed-tensors" and layer.group != -1 and layer.in_part % layer.group:
        # its WNA16 scheme splits the scales with the input and refuses a group straddling the split
        return "none", (
            f"compressed-tensors: in_features per partition {layer.in_part} is not a multiple of the "
            f"group size {layer.group}"
        )
    for name, check in _MP_KERNELS:
        if (why := check(layer, cc)) is None:
            slower = name not in ("machete", "marlin") or (name == "marlin" and cc == 90)
            return name, ("; ".join(reasons) if slower and reasons else None)
        reasons.append(why)
    return "none", "no vLLM kernel takes it: " + "; ".join(reasons)


def predict_kernels(config: dict, fmt_name: str, scheme: QuantScheme, desc_act: bool) -> dict:
    """{"method", "vllm", "refused", "min_capability", "tp": {"1": {"ok", "kernels", "by_gpu", "problems"}, ...}}.

    `kernels` is the fused layer -> kernel map on the fastest GPU (sm90), `by_gpu` the same per GPU generation
    (GPUS). Kernels: "machete", "marlin", "exllama", "triton_w4a16", "awq_gemm", or "none" (vLLM refuses); a MoE
    model's "experts" layer gets "marlin_moe" or "moe_wna16"."""
    shapes = {s.name: s for s in linear_shapes(config)}
    layers = fused_layers(shapes)
    refused = refusal(fmt_name, scheme, desc_act)
    zero_points = not scheme.sym
    result = {
        "method": vllm_method(fmt_name, scheme),
        "vllm": VLLM_VERSION,
        "refused": refused,
        "min_capability": {"format": FORMAT_MIN_CAPABILITY, **KERNEL_MIN_CAPABILITY},
        "tp": {},
    }
    for tp in TP_SIZES:
        problems: list[str] = [refused] if refused else []
        if (whole := model_problem(config, tp)) is not None:
            problems.append(whole)
        by_gpu: dict[str, dict[str, str]] = {gpu: {} for gpu in GPUS}
        for fused, (split, members) in layers.items():
            out_part, in_part, in_full, problem = _partition(config, shapes, split, members, tp)
            if problem or whole or refused:
                for kernels in by_gpu.values():
                    kernels[fused] = "none"
                if problem:
                    problems.append(f"{fused}: {problem}")
                continue
            layer = _Layer(out_part, in_part, in_full, scheme.group_size, scheme.bits, zero_points)
            for gpu, cc in GPUS.items():
                kernel, why = layer_kernel(fmt_name, layer, cc)
                by_gpu[gpu][fused] = kernel
                if why and gpu == FASTEST_GPU or kernel == "none":
                    note = f"{fused} on {gpu}: {kernel} ({why})" if kernel != "none" else f"{fused} on {gpu}: {why}"
                    if note not in problems:
                        problems.append(note)
        if any(name.endswith(EXPERT_SUFFIXES) for name in shapes):
            for gpu, cc in GPUS.items():
                kernel, why = ("none", None) if whole or refused else expert_kernel(config, shapes, scheme, tp, cc)
                by_gpu[gpu]["experts"] = kernel
                if why and (gpu == FASTEST_GPU or kernel == "none"):
                    note = f"experts on {gpu}: {kernel} ({why})"
                    if note not in problems:
                        problems.append(note)
        kernels = by_gpu[FASTEST_GPU]
        result["tp"][str(tp)] = {
            "ok": all(k != "none" for k in kernels.values()),
            "kernels": kernels,
            "by_gpu": by_gpu,
            "problems": problems,
        }
    return result


def _counts(kernels: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for kernel in kernels.values():
        counts[kernel] = counts.get(kernel, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))


def summarize(prediction: dict) -> dict[str, str]:
    """TP size -> one line, e.g. "auto_gptq: sm90 machete x1, marlin x3; sm80 sm75 marlin x4" or "fails: ..."."""
    lines = {}
    for tp, entry in prediction["tp"].items():
        if not entry["ok"]:
            lines[tp] = "fails: " + "; ".join(entry["problems"][:3])
            continue
        groups: dict[str, list[str]] = {}
        for gpu, kernels in entry["by_gpu"].items():
            groups.setdefault(_counts(kernels), []).append(gpu)
        lines[tp] = f"{prediction['method']}: " + "; ".join(f"{' '.join(g)} {c}" for c, g in groups.items())
    return lines


def serve_command(out_dir, fmt_name: str) -> str:
    """The `vllm serve` line for users. No --quantization: vLLM reads quantization_config and picks the fastest
    kernel per layer. (In vLLM 0.32 every alias loads the same way; in older vLLM `--quantization awq` or `gptq`
    forced the slowest kernels.)"""
    return f"vllm serve {out_dir} --dtype float16"
