"""Architecture mappings as data: where the decoder layers live, which linears share an input, and where
AWQ's per-channel scales fold. Adding a family means adding one entry to ARCHITECTURES.

Every supported family is a pre-norm residual decoder:
    h = h + o_proj(attention(q_proj, k_proj, v_proj)(input_layernorm(h)))
    h = h + down_proj(act(gate_proj(x)) * up_proj(x)),  x = post_attention_layernorm(h)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from mergeq.core.errors import MergeqError


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input, quantized together (one Hessian, one AWQ scale).

    `fold_into` names the module whose output feeds them and absorbs AWQ's 1/s: a norm (its weight) or a
    linear (its rows and bias). `fold_kind` is "norm" or "linear". A linear fold applies only when the
    shapes match (for example v_proj -> o_proj needs as many key/value heads as query heads).
    `clip` is False for q/k, whose errors matter through the softmax and which AWQ does not clip.
    """

    name: str
    linears: tuple[str, ...]
    fold_into: str | None
    fold_kind: str
    clip: tuple[bool, ...]


@dataclass(frozen=True)
class Architecture:
    family: str
    modeling_module: str  # transformers module that defines the classes below
    decoder_class: str
    rotary_class: str
    layers_prefix: str  # "model.layers." + index + "." + module path
    embed: str
    final_norm: str
    lm_head: str
    attention: str  # the attention module inside a decoder layer
    mlp: str
    input_norm: str
    post_attention_norm: str
    groups: tuple[LinearGroup, ...]

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}{index}."

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group.linears)

    def classes(self):
        module = importlib.import_module(self.modeling_module)
        return getattr(module, self.decoder_class), getattr(module, self.rotary_class)


def _llama_like(family: str, module: str, prefix: str) -> Architecture:
    return Architecture(
        family=family,
        modeling_module=f"transformers.models.{module}.modeling_{module}",
        decoder_class=f"{prefix}DecoderLayer",
        rotary_class=f"{prefix}RotaryEmbedding",
        layers_prefix="model.layers.",
        embed="model.embed_tokens.weight",
        final_norm="model.norm.weight",
        lm_head="lm_head.weight",
        attention="self_attn",
        mlp="mlp",
        input_norm="input_layernorm",
        post_attention_norm="post_attention_layernorm",
        groups=(
            LinearGroup(
                "attn_in",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                fold_into="input_layernorm",
                fold_kind="norm",
                clip=(False, False, True),
            ),
            LinearGroup(
                "attn_out", ("self_attn.o_proj",), fold_into="self_attn.v_proj", fold_kind="linear", clip=(True,)
            ),
            LinearGroup(
                "mlp_in",
                ("mlp.gate_proj", "mlp.up_proj"),
                fold_into="post_attention_layernorm",
                fold_kind="norm",
                clip=(True, True),
            ),
            LinearGroup("mlp_out", ("mlp.down_proj",), fold_into="mlp.up_proj", fold_kind="linear", clip=(True,)),
        ),
    )


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": _llama_like("llama", "llama", "Llama"),
    "MistralForCausalLM": _llama_like("mistral", "mistral", "Mistral"),
    "Qwen2ForCausalLM": _llama_like("qwen2", "qwen2", "Qwen2"),
}


def architecture_of(config: dict) -> Architecture:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise MergeqError(
        f"architecture {names or config.get('model_type')!r} is not supported by the int4 exporters",
        hint=f"supported: {', '.join(ARCHITECTURES)}; add a mapping in mergeq/core/arch.py",
    )
