"""The int4 checkpoint formats vLLM loads, each a writer and a reader of the same tensors.

- gptq (AutoGPTQ v1 layout, `quant_method: gptq`): qweight int32 [in/8, out] packed along the input
  dimension; qzeros int32 [G, out/8] packed along the output dimension, holding zero-1 (the v1 quirk that
  exllama and vLLM undo by adding 1); scales float16 [G, out]; g_idx int32 [in].
- awq (AutoAWQ GEMM layout, `quant_method: awq`, `version: gemm`): qweight int32 [in, out/8] and qzeros
  int32 [G, out/8] packed along the output dimension with the interleave [0, 2, 4, 6, 1, 3, 5, 7];
  scales float16 [G, out].
- compressed-tensors (`format: pack-quantized`): weight_packed int32 [out, in/8] (signed codes + 8),
  weight_scale [out, G], weight_shape int64 [2], weight_zero_point int32 [out/8, G] packed along the output
  dimension (asymmetric only), weight_g_idx int32 [in] (activation order only).

All bits are lowest-first within a word. `dequantized_state_dict` reads any of them back into a plain
state dict with the original Hugging Face names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from exporters.int4.checkpoint import TensorSource
from exporters.int4.exclude import NONE_EXCLUDED, Exclusions
from exporters.int4.families import family_of
from exporters.int4.quant import (
    QuantizedLinear,
    QuantScheme,
    default_g_idx,
    pack_first,
    pack_last,
    unpack_first,
    unpack_last,
)
from mergeq.core.errors import MergeqError
from mergeq.core.experts import module_state_dict
from mergeq.core.modelfiles import read_model_config

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]

Getter = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class LinearLayout:
    """What a format needs of a linear's shape, as (dimension name, divisor) rules."""

    in_multiple: int
    out_multiple: int


class GptqFormat:
    name = "gptq"
    marker = "qweight"

    def layout(self, scheme: QuantScheme) -> LinearLayout:
        per_word = 32 // scheme.bits
        return LinearLayout(in_multiple=per_word, out_multiple=per_word)

    def adapt_scheme(self, scheme: QuantScheme) -> QuantScheme:
        # v1 stores zero-1 in `bits` bits: an asymmetric zero point of 0 cannot be written.
        if scheme.sym:
            return scheme
        return QuantScheme(bits=scheme.bits, group_size=scheme.group_size, sym=False, min_zero=1)

    def linear_tensors(self, prefix: str, q: QuantizedLinear, scheme: QuantScheme, desc_act: bool) -> dict:
        if int(q.zeros.min()) < 1:
            raise MergeqError(f"{prefix}: a zero point of 0 cannot be stored in the GPTQ v1 layout")
        tensors = {
            f"{prefix}.qweight": pack_first(q.codes.t(), scheme.bits),
            f"{prefix}.qzeros": pack_last((q.zeros.t().to(torch.int64) - 1), scheme.bits),
            f"{prefix}.scales": q.scales.t().contiguous().to(torch.float16),
            f"{prefix}.g_idx": q.g_idx.to(torch.int32).contiguous(),
        }
        if q.bias is not None:
            tensors[f"{prefix}.bias"] = q.bias.to(torch.float16)
        return tensors

    def quantization_config(
        self, scheme: QuantScheme, desc_act: bool, damp_percent: float | None, excluded: Exclusions = NONE_EXCLUDED
    ) -> dict:
        return {
            "quant_method": "gptq",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "desc_act": desc_act,
            "sym": scheme.sym,
            "damp_percent": damp_percent if damp_percent is not None else 0.01,
            "true_sequential": True,
            "static_groups": False,
            "lm_head": False,
            "checkpoint_format": "gptq",
        } | (
            # GPTQModel's negative `dynamic` rules, which vLLM and transformers follow: one per kept linear, and
            # one per fused layer as vLLM names it
            {"dynamic": {f"-:{re.escape(name)}$": {} for name in excluded.with_fused_names()}} if excluded else {}
        )

    def side_files(self, qconfig: dict) -> dict[str, dict]:
        return {"quantize_config.json": qconfig}

    def read_linear(self, prefix: str, get: Getter, qconfig: dict, names: set[str]) -> QuantizedLinear:
        bits = int(qconfig.get("bits", 4))
        v2 = qconfig.get("checkpoint_format", "gptq") == "gptq_v2"
        codes = unpack_first(get(f"{prefix}.qweight"), bits).t()
        zeros = unpack_last(get(f"{prefix}.qzeros"), bits)
        if not v2:
            zeros = zeros + 1
        scales = get(f"{prefix}.scales")
        out_features, in_features = codes.shape
        zeros = zeros[:, :out_features].t()
        if f"{prefix}.g_idx" in names:
            g_idx = get(f"{prefix}.g_idx").to(torch.int32)
        else:
            g_idx = default_g_idx(in_features, int(qconfig.get("group_size", -1)))
        return QuantizedLinear(
            codes=codes.contiguous(),
            scales=scales.t().contiguous(),
            zeros=zeros.contiguous(),
            g_idx=g_idx,
            bias=_optional(get, f"{prefix}.bias", names),
        )


class AwqFormat:
    name = "awq"
    marker = "qweight"

    def layout(self, scheme: QuantScheme) -> LinearLayout:
        return LinearLayout(in_multiple=1, out_multiple=32 // scheme.bits)

    def adapt_scheme(self, scheme: QuantScheme) -> QuantScheme:
        return scheme

    def linear_tensors(self, prefix: str, q: QuantizedLinear, scheme: QuantScheme, desc_act: bool) -> dict:
        if desc_act:
            raise MergeqError("the AWQ format has no activation order (g_idx)", hint="drop --desc-act")
        order = AWQ_ORDER if scheme.bits == 4 else [0, 2, 1, 3]
        tensors = {
            f"{prefix}.qweight": pack_last(q.codes.t(), scheme.bits, order),
            f"{prefix}.qzeros": pack_last(q.zeros.t(), scheme.bits, order),
            f"{prefix}.scales": q.scales.t().contiguous().to(torch.float16),
        }
        if q.bias is not None:
            tensors[f"{prefix}.bias"] = q.bias.to(torch.float16)
        return tensors

    def quantization_config(
        self, scheme: QuantScheme, desc_act: bool, damp_percent: float | None, excluded: Exclusions = NONE_EXCLUDED
    ) -> dict:
        return {
            "quant_method": "awq",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": list(excluded.names) or None,  # matched as substrings of full names
        }

    def side_files(self, qconfig: dict) -> dict[str, dict]:
        return {
            "quant_config.json": {
                "zero_point": True,
                "q_group_size": qconfig["group_size"],
                "w_bit": qconfig["bits"],
                "version": "GEMM",
            }
        }

    def read_linear(self, prefix: str, get: Getter, qconfig: dict, names: set[str]) -> QuantizedLinear:
        bits = int(qconfig.get("bits", qconfig.get("w_bit", 4)))
        group_size = int(qconfig.get("group_size", qconfig.get("q_group_size", -1)))
        order = AWQ_ORDER if bits == 4 else [0, 2, 1, 3]
        codes = unpack_last(get(f"{prefix}.qweight"), bits, order).t()
        zeros = unpack_last(get(f"{prefix}.qzeros"), bits, order).t()
        scales = get(f"{prefix}.scales").t()
        in_features = codes.shape[1]
        return QuantizedLinear(
            codes=codes.contiguous(),
            scales=scales.contiguous(),
            zeros=zeros.contiguous(),
            g_idx=default_g_idx(in_features, group_size),
            bias=_optional(get, f"{prefix}.bias", names),
        )


class CompressedTensorsFormat:
    name = "compressed-tensors"
    marker = "weight_packed"

    def layout(self, scheme: QuantScheme) -> LinearLayout:
        per_word = 32 // scheme.bits
        return LinearLayout(in_multiple=per_word, out_multiple=1 if scheme.sym else per_word)

    def adapt_scheme(self, scheme: QuantScheme) -> QuantScheme:
        return scheme

    def linear_tensors(self, prefix: str, q: QuantizedLinear, scheme: QuantScheme, desc_act: bool) -> dict:
        if desc_act:
            raise MergeqError(
                "compressed-tensors removed groups in activation order (actorder 'group')",
                hint="drop --desc-act, or use --format native",
            )
        out_features, in_features = q.codes.shape
        tensors = {
            f"{prefix}.weight_packed": pack_last(q.codes, scheme.bits),
            f"{prefix}.weight_scale": q.scales.contiguous().to(torch.float16),
            f"{prefix}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
        }
        if not scheme.sym:
            tensors[f"{prefix}.weight_zero_point"] = pack_first(q.zeros, scheme.bits)
        if q.bias is not None:
            tensors[f"{prefix}.bias"] = q.bias.to(torch.float16)
        return tensors

    def quantization_config(
        self, scheme: QuantScheme, desc_act: bool, damp_percent: float | None, excluded: Exclusions = NONE_EXCLUDED
    ) -> dict:
        weights = {
            "num_bits": scheme.bits,
            "type": "int",
            "symmetric": scheme.sym,
            "strategy": "channel" if scheme.group_size == -1 else "group",
            "group_size": None if scheme.group_size == -1 else scheme.group_size,
            "dynamic": False,
            "actorder": None,  # g_idx stays trivial: --desc-act is refused for this format in preflight
            "block_structure": None,
            "observer": "minmax",
            "observer_kwargs": {},
        }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": None,
                    "output_activations": None,
                    "format": "pack-quantized",
                }
            },
            "ignore": ["lm_head", *excluded.names],
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
        }

    def side_files(self, qconfig: dict) -> dict[str, dict]:
        return {}

    def read_linear(self, prefix: str, get: Getter, qconfig: dict, names: set[str]) -> QuantizedLinear:
        groups = qconfig.get("config_groups") or {}
        if len(groups) != 1:
            raise MergeqError(f"compressed-tensors: expected one config group, found {len(groups)}")
        weights = next(iter(groups.values()))["weights"]
        bits = int(weights["num_bits"])
        out_features, in_features = (int(v) for v in get(f"{prefix}.weight_shape").tolist())
        codes = unpack_last(get(f"{prefix}.weight_packed"), bits)[:, :in_features]
        scales = get(f"{prefix}.weight_scale")
        if scales.dim() == 1:
            scales = scales[:, None]
        if weights.get("symmetric", True):
            zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int64)
        else:
            zeros = unpack_first(get(f"{prefix}.weight_zero_point"), bits)[:out_features]
        if f"{prefix}.weight_g_idx" in names:
            g_idx = get(f"{prefix}.weight_g_idx").to(torch.int32)
        else:
            group_size = weights.get("group_size") or -1
            g_idx = default_g_idx(in_features, int(group_size) if weights.get("strategy") == "group" else -1)
        return QuantizedLinear(
            codes=codes.contiguous(),
            scales=scales.contiguous(),
            zeros=zeros.contiguous(),
            g_idx=g_idx,
            bias=_optional(get, f"{prefix}.bias", names),
        )


FORMATS = {"gptq": GptqFormat(), "awq": AwqFormat(), "compressed-tensors": CompressedTensorsFormat()}


def _optional(get: Getter, name: str, names: set[str]) -> torch.Tensor | None:
    return get(name) if name in names else None


def format_of(qconfig: dict):
    method = str(qconfig.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        fmt = qconfig.get("format")
        if fmt != "pack-quantized":
            raise MergeqError(f"compressed-tensors format {fmt!r} is not supported", hint="mergeq reads pack-quantized")
        return FORMATS["compressed-tensors"]
    if method == "awq" and str(qconfig.get("version", "gemm")).lower() != "gemm":
        raise MergeqError(f"AWQ version {qconfig.get('version')!r} is not supported", hint="mergeq reads version gemm")
    if method in ("gptq", "awq"):
        return FORMATS[method]
    raise MergeqError(
        f"quantization_config quant_method {method!r} is not supported",
        hint="mergeq reads gptq, awq (gemm) and compressed-tensors (pack-quantized)",
    )


def quantization_config_of(model_dir: Path) -> dict:
    config = read_model_config(model_dir)
    qconfig = config.get("quantization_config")
    if not qconfig:
        raise MergeqError(
            f"{Path(model_dir) / 'config.json'} has no quantization_config",
            hint="this is not a gptq, awq or compressed-tensors checkpoint",
        )
    return qconfig


def read_quantized(model_dir: Path) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
    """The quantized linears (by module name) and the remaining plain tensors of a checkpoint."""
    qconfig = quantization_config_of(model_dir)
    fmt = format_of(qconfig)
    source = TensorSource(model_dir)
    names = set(source.names())
    suffix = "." + fmt.marker
    prefixes = sorted(n[: -len(suffix)] for n in names if n.endswith(suffix))
    linears = {prefix: fmt.read_linear(prefix, source.get, qconfig, names) for prefix in prefixes}
    owned = {n for n in names if any(n.startswith(p + ".") for p in prefixes)} if prefixes else set()
    plain = {n: source.get(n) for n in sorted(names - owned)}
    source.close()
    return linears, plain


def dequantized_state_dict(
    model_dir: Path, dtype: torch.dtype | None = None, *, module_names: bool = False
) -> dict[str, torch.Tensor]:
    """A plain state dict with the original Hugging Face names (`...q_proj.weight`, biases, norms,
    embeddings), with every quantized linear reconstructed from the packed tensors on disk.

    Works for gptq, awq (gemm) and compressed-tensors (pack-quantized) checkpoints, detected from
    config.json's quantization_config. Dequantized weights are float32 (exact (code - zero) * scale);
    other tensors keep their stored dtype. `dtype` casts every floating tensor. `module_names`: the names of
    the transformers modules instead (a MoE family's per-expert tensors stacked into its fused experts), for
    `model.load_state_dict`.
    """
    linears, plain = read_quantized(model_dir)
    state: dict[str, torch.Tensor] = {}
    for prefix, linear in linears.items():
        state[f"{prefix}.weight"] = linear.dequantize(torch.float32)
        if linear.bias is not None:
            state[f"{prefix}.bias"] = linear.bias
    state.update(plain)
    if module_names:
        state = module_state_dict(state, family_of(read_model_config(model_dir)).experts)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return dict(sorted(state.items()))
