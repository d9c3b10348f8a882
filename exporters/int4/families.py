"""What the int4 engine must know about a model family, as data: where AWQ's scales fold, and how a
Mixture-of-Experts family stores its experts on disk (mergeq/core/experts.py). Everything else (which linears a
decoder layer has, their order, what each layer receives) the engine finds by running the model's own modules, so
a family without an entry still quantizes with GPTQ and RTN; AWQ refuses it.

AWQ multiplies the input columns of a group of linears (those reading one input) by s and divides the
producer of that input by s. A fold is exact only where the producer's output reaches the group unchanged
up to a per-channel factor:
- a norm computing x * w: divide w by s ("norm");
- a norm computing x * (1 + w) (Gemma): (1 + w) / s - 1 ("norm_plus_one");
- a linear whose output rows feed the group channel by channel, through attention's value mixing or the
  gated MLP's product: divide those rows (and bias) by s ("linear"). `chunks` says the producer's rows are
  that many blocks of len(s) and the last block feeds the group (Phi-3's fused qkv_proj and gate_up_proj).
  When the rows do not split that way (grouped-query attention: fewer value heads than query heads) the
  fold is skipped and the group is quantized with scale 1, as AutoAWQ does.
- `also_scale`: full-precision modules reading the same normed input (a MoE router), whose weight columns
  are multiplied by s so their outputs stay exact.
The engine checks every fold numerically (the float layer's output before and after folding must agree),
so a wrong entry fails loudly instead of degrading the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mergeq.core.errors import MergeqError
from mergeq.core.experts import EXPERT_LAYOUTS, ExpertLayout

FOLD_KINDS = ("norm", "norm_plus_one", "linear")


@dataclass(frozen=True)
class Fold:
    group: str  # a linear of the group (relative to the layer), or the experts module for their shared input
    into: str  # the module producing the group's input
    kind: str  # one of FOLD_KINDS
    chunks: int = 1  # "linear": the producer's rows are `chunks` blocks of len(s); the last one feeds the group
    also_scale: tuple[str, ...] = ()  # modules with a `weight` reading the same input, kept in full precision

    def __post_init__(self):
        if self.kind not in FOLD_KINDS:
            raise ValueError(f"fold kind {self.kind!r} is not one of {FOLD_KINDS}")


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    awq: tuple[Fold, ...] | None  # None: AWQ has no entry for this family and refuses it
    awq_notes: tuple[str, ...] = ()  # folds the math does not allow, said in the report
    experts: ExpertLayout | None = None
    no_clip: tuple[str, ...] = ("q_proj", "k_proj", "qkv_proj")  # AWQ leaves softmax inputs unclipped
    excluded: tuple[str, ...] = (r"(^|\.)(gate|router|shared_expert_gate)$",)  # routers stay full precision
    generic: bool = False  # built for a family nobody listed

    def awq_fold(self, group: str) -> Fold | None:
        return next((fold for fold in self.awq or () if fold.group == group), None)

    def clips(self, linear: str) -> bool:
        leaf = linear.rpartition(".")[2]
        return not any(leaf == name or leaf.startswith(name) for name in self.no_clip)


def _attention_folds(norm_kind: str = "norm", norm: str = "input_layernorm") -> tuple[Fold, ...]:
    return (Fold("self_attn.q_proj", norm, norm_kind), Fold("self_attn.o_proj", "self_attn.v_proj", "linear"))


def _mlp_folds(norm: str = "post_attention_layernorm", norm_kind: str = "norm") -> tuple[Fold, ...]:
    return (Fold("mlp.gate_proj", norm, norm_kind), Fold("mlp.down_proj", "mlp.up_proj", "linear"))


LLAMA_FOLDS = _attention_folds() + _mlp_folds()
SANDWICH = "post_attention_layernorm and post_feedforward_layernorm act on sublayer outputs: nothing to fold"
GEMMA_FOLDS = _attention_folds("norm_plus_one") + _mlp_folds("pre_feedforward_layernorm", "norm_plus_one")
MOE_FOLDS = _attention_folds() + (Fold("mlp.experts", "post_attention_layernorm", "norm", also_scale=("mlp.gate",)),)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), LLAMA_FOLDS),
    Family("mistral", ("MistralForCausalLM",), LLAMA_FOLDS),
    Family("qwen2", ("Qwen2ForCausalLM",), LLAMA_FOLDS),
    # q_norm/k_norm act on q_proj/k_proj's outputs per head: the input norm still folds into q, k, v
    Family("qwen3", ("Qwen3ForCausalLM",), LLAMA_FOLDS),
    # x * (1 + w) norms; post_attention_layernorm and post_feedforward_layernorm act on outputs (sandwich norms)
    Family("gemma2", ("Gemma2ForCausalLM",), GEMMA_FOLDS, awq_notes=(SANDWICH,)),
    Family("gemma3", ("Gemma3ForCausalLM",), GEMMA_FOLDS, awq_notes=(SANDWICH,)),
    Family(
        "phi3",
        ("Phi3ForCausalLM",),
        (
            Fold("self_attn.qkv_proj", "input_layernorm", "norm"),
            Fold("self_attn.o_proj", "self_attn.qkv_proj", "linear", chunks=3),
            Fold("mlp.gate_up_proj", "post_attention_layernorm", "norm"),
            Fold("mlp.down_proj", "mlp.gate_up_proj", "linear", chunks=2),
        ),
    ),
    Family(
        "olmo2",
        ("Olmo2ForCausalLM",),
        (Fold("self_attn.o_proj", "self_attn.v_proj", "linear"), Fold("mlp.down_proj", "mlp.up_proj", "linear")),
        awq_notes=(
            (
                "OLMo 2 normalizes sublayer outputs (post-norm): q/k/v and gate/up read the raw residual "
                "stream, which no single module produces, so their scales are not folded (scale 1, clipped)"
            ),
        ),
    ),
    Family(
        "mixtral",
        ("MixtralForCausalLM",),
        MOE_FOLDS,
        experts=EXPERT_LAYOUTS["MixtralForCausalLM"],
    ),
    Family(
        "qwen3_moe",
        ("Qwen3MoeForCausalLM",),
        MOE_FOLDS + _mlp_folds(),
        experts=EXPERT_LAYOUTS["Qwen3MoeForCausalLM"],
    ),
)


def family_of(config: dict) -> Family:
    """The entry for config.json's architecture, or a generic family (GPTQ and RTN only)."""
    names = config.get("architectures") or []
    for family in FAMILIES:
        if any(name in family.architectures for name in names):
            return family
    label = names[0] if names else str(config.get("model_type", "unknown"))
    return Family(label, tuple(names), awq=None, generic=True)


def require_awq(family: Family) -> None:
    if family.awq is None:
        known = ", ".join(a for f in FAMILIES if f.awq is not None for a in f.architectures)
        raise MergeqError(
            f"AWQ has no scale-fold map for {family.name}: where its scales may fold is not known",
            hint=f"use GPTQ (`mergeq export gptq`), which works without one; AWQ knows {known} "
            "(a map is one entry in exporters/int4/families.py)",
        )


def excluded(family: Family, name: str, patterns: tuple[str, ...] = ()) -> bool:
    """Whether the linear `name` (relative to its layer, or full) stays in full precision."""
    return any(re.search(p, name) for p in family.excluded + tuple(patterns))


def quantized_linears(layer, family: Family) -> dict:
    """The nn.Linear modules of one decoder layer that the int4 engine quantizes, by name inside the layer: all
    but the family's routers and gates, and but what sits inside its stacked-experts module (quantized as
    experts, not as linears). User exclusions (--exclude) are applied on top by the callers that take them."""
    from torch import nn

    experts = family.experts.module if family.experts else None
    return {
        name: module
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
        and not excluded(family, name)
        and not (experts and name.startswith(experts + "."))
    }


@dataclass
class FoldReport:
    """What AWQ folded in one layer: group -> alpha (None: not folded, with the reason in `skipped`)."""

    alpha: dict[str, float | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
