"""Tiny random checkpoints of the decoder families people fine-tune, built from transformers configs in the test.

Every family has 2+ layers; Gemma 2 and Gemma 3 have sliding-window and global attention layers (both kinds
present, a window shorter than the test inputs) and tie lm_head to the input embedding. Gemma 2 alternates them;
Gemma 3 (the text model, Gemma3ForCausalLM) has 6 layers in its own pattern, five sliding then one global, which is
also the pattern llama.cpp assumes for it (its converter does not read layer_types). Phi-3 has fused qkv_proj and
gate_up_proj; Mixtral and Qwen3-MoE have 4 experts, 2 per token (in transformers 5 their experts are fused 3-D
parameters in memory and per-expert tensors on disk).
"""

from __future__ import annotations

from pathlib import Path

import torch

# family -> (config class, model class, config values beyond the shared ones)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": 4,
            "query_pre_attn_scalar": 16,
            "tie_word_embeddings": True,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16, "tie_word_embeddings": True},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "head_dim": 16,
            "norm_topk_prob": True,
        },
    ),
}
MOE_FAMILIES = ("mixtral", "qwen3_moe")
# the Linear modules a LoRA adapter targets in each family (the MoE experts are parameters, not modules)
LINEAR_TARGETS: dict[str, list[str]] = {
    **{
        f: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        for f in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2")
    },
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
# the fused expert parameters of the MoE families, as PEFT's target_parameters names them
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LAYERS = {"gemma3": 6}  # decoder layers where a family needs more than 2 for both of its layer kinds


def family_config(
    family: str, *, vocab: int = 96, layers: int | None = None, hidden: int = 64, intermediate: int = 128
):
    import transformers

    layers = layers or LAYERS.get(family, 2)
    config_name, _, extra = FAMILIES[family]
    values = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        **extra,
    }
    if "layer_types" in values:  # alternate the two kinds over however many layers there are
        values["layer_types"] = [extra["layer_types"][i % 2] for i in range(layers)]
    return getattr(transformers, config_name)(**values)


def family_model(folder: Path, family: str, *, dtype=torch.float32, seed: int = 0, **shape) -> Path:
    """A random checkpoint of `family` saved to `folder` (no tokenizer)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(family_config(family, **shape))
    with torch.no_grad():  # norms away from their init values, so a norm mistake shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.to(dtype).save_pretrained(folder)
    return Path(folder)
