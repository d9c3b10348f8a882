"""LoRA on parameters (PEFT's `target_parameters`), above all the fused expert tensors of MoE models.

In transformers 5 an MoE layer's experts are one module with 3-D parameters, `gate_up_proj` (experts, 2*I, H) and
`down_proj` (experts, H, I); checkpoints still store one 2-D tensor per expert and projection (transformers
converts on load and back on save). PEFT wraps each targeted parameter in a ParamWrapper; two targeted parameters
of one module nest in the order the module defines them (not the order of `target_parameters`, which the saved
config does not keep): for the experts, `<module>.base_layer.lora_A.weight` is gate_up_proj's and
`<module>.lora_A.weight` down_proj's. Its lora_A is (experts*r, in), expert-major;
its lora_B is (out, r*experts), rank-major; expert e's delta is scale * B[:, :, e] @ A[e] (PEFT's einsum
"o r e, e r i -> e o i"). A 2-D parameter (one expert) is a plain LoRA and never reaches this module.

Here: which adapter modules are such wrappers and which parameter each one changes, and where each expert's delta
lands on disk (EXPERT_LAYOUTS: the layouts of mergeq/core/experts.py, by model_type).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergeq.core.errors import MergeqError
from mergeq.core.experts import EXPERT_LAYOUTS as BY_ARCHITECTURE
from mergeq.core.experts import ExpertLayout

PEFT_HINT = (
    "PEFT can merge it: load the base with transformers, apply the adapter with PeftModel.from_pretrained, "
    "call merge_and_unload() and save_pretrained(), then give that folder to mergeq as the base model "
    "without this adapter"
)


# fused parameters in the order the experts module defines them (the nesting order of PEFT's wrappers)
PARAMETER_ORDER = ("gate_up_proj", "down_proj")

EXPERT_LAYOUTS: dict[str, ExpertLayout] = {  # by config.json model_type (mergeq/core/experts.py's entries)
    "mixtral": BY_ARCHITECTURE["MixtralForCausalLM"],
    "qwen3_moe": BY_ARCHITECTURE["Qwen3MoeForCausalLM"],
}


@dataclass(frozen=True)
class ExpertLora:
    """One adapter's LoRA on one fused expert parameter."""

    module: str  # in-memory module path, e.g. model.layers.0.mlp.experts
    parameter: str  # gate_up_proj
    r: int
    scale: float
    experts: int
    in_features: int
    out_features: int
    a_key: str
    b_key: str

    @property
    def name(self) -> str:
        return f"{self.module}.{self.parameter}"


@dataclass(frozen=True)
class ExpertSlice:
    """Where one per-expert tensor on disk sits in the fused parameter's delta: expert `expert`, rows [start, stop)."""

    lora: ExpertLora
    expert: int
    start: int
    stop: int


def wrapped_parameters(config: dict, wrappers: dict[str, int], adapter_path) -> dict[str, tuple[str, str]]:
    """{adapter module path: (owner module, parameter)} for the ParamWrapper modules of a target_parameters
    adapter; `wrappers` maps each candidate owner module to the number of nested wrappers the adapter has there."""
    targets = list(config.get("target_parameters") or [])
    found: dict[str, tuple[str, str]] = {}
    for owner, depth_count in wrappers.items():
        params = {
            t.rpartition(".")[2]
            for t in targets
            if owner == t.rpartition(".")[0] or owner.endswith("." + t.rpartition(".")[0])
        }
        if len(params) != depth_count:
            continue  # not a parameter wrapper (or not one we can name): left to the module LoRA rules
        if depth_count > 1 and not params <= set(PARAMETER_ORDER):
            raise MergeqError(
                f"adapter {adapter_path}: LoRA on the parameters {sorted(params)} of {owner} "
                "(target_parameters): mergeq cannot tell which of the nested tensors belongs to which "
                "parameter",
                hint=PEFT_HINT,
            )
        ordered = sorted(params, key=lambda p: PARAMETER_ORDER.index(p) if p in PARAMETER_ORDER else 0)
        for depth in range(depth_count):  # depth 0 is the outermost wrapper, the parameter defined last
            found[owner + ".base_layer" * depth] = (owner, ordered[depth_count - 1 - depth])
    return found


def disk_slices(lora: ExpertLora, model_type: str | None, shapes: dict, adapter_path) -> dict[str, ExpertSlice]:
    """The per-expert tensors on disk that `lora` changes, each with its expert and rows; refuses what it cannot
    place."""
    layout = EXPERT_LAYOUTS.get(model_type or "")
    if layout is None or not lora.module.endswith(layout.module) or lora.parameter not in layout.parts:
        raise MergeqError(
            f"adapter {adapter_path}: LoRA on the fused parameter {lora.name} (target_parameters), but mergeq does "
            f"not know how a {model_type!r} checkpoint stores it on disk (known: {', '.join(sorted(EXPERT_LAYOUTS))})",
            hint=PEFT_HINT,
        )
    prefix = lora.module[: len(lora.module) - len(layout.module)]
    slices: dict[str, ExpertSlice] = {}
    for expert in range(lora.experts):
        start = 0
        for part in layout.parts[lora.parameter]:
            name = f"{prefix}{layout.disk}.{expert}.{part}.weight"
            if name not in shapes:
                raise MergeqError(
                    f"adapter {adapter_path}: {lora.name} has {lora.experts} experts but the base has no tensor {name}",
                    hint="the adapter was trained on another base model; pass the base it was trained on",
                )
            rows = shapes[name][1][0]
            slices[name] = ExpertSlice(lora, expert, start, start + rows)
            start += rows
        if start != lora.out_features:
            raise MergeqError(
                f"adapter {adapter_path}: {lora.name} has {lora.out_features} output features but "
                f"the base's expert tensors {', '.join(layout.parts[lora.parameter])} have {start} rows",
                hint="the adapter was trained on another base model; pass the base it was trained on",
            )
    return slices


def expert_factors(
    lora: ExpertLora, a: torch.Tensor, b: torch.Tensor, piece: ExpertSlice
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_e rows [start, stop), A_e): one expert's change to one of its tensors is scale * left @ right."""
    a_e = a.reshape(lora.experts, lora.r, a.shape[-1])[piece.expert]
    b_e = b.reshape(b.shape[0], lora.r, lora.experts)[piece.start : piece.stop, :, piece.expert]
    return b_e.contiguous(), a_e.contiguous()
