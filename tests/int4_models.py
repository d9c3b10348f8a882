"""Tiny random decoder checkpoints with a byte-level tokenizer and loud norm channels, for the int4 tests: every
family of tests/family_models.py, and one the int4 engine has no entry for."""

from __future__ import annotations

from pathlib import Path

import torch
from family_models import FAMILIES as FAMILY_CONFIGS  # noqa: E402 (tests/ is on sys.path)
from family_models import LAYERS as FAMILY_LAYERS

FAMILIES = ("llama", "mistral", "qwen2")
# the other families the int4 engine handles (their configs: tests/family_models.py): Qwen3, Gemma 2 and 3
# (sliding and global layers), Phi-3, OLMo 2, Mixtral, Qwen3-MoE
MORE_FAMILIES = tuple(f for f in FAMILY_CONFIGS if f not in FAMILIES)
# a family the int4 engine has no entry for (non-gated MLP c_fc/c_proj with biases, LayerNorm)
UNLISTED_FAMILIES = {"starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {})}


def byte_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=None)
    fast.save_pretrained(folder)
    return fast


def tiny_model(
    folder: Path,
    family: str = "llama",
    *,
    layers: int | None = None,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    dtype=torch.float16,
    tokenizer: bool = True,
    overrides: dict | None = None,
) -> Path:
    """A random decoder-only checkpoint of `family`, with outlier input channels like real LLMs have."""
    import transformers

    torch.manual_seed(seed)
    layers = layers or FAMILY_LAYERS.get(family, 2)  # Gemma 3 needs 6 for a global layer after its 5 sliding ones
    config_name, model_name, extra = {**FAMILY_CONFIGS, **UNLISTED_FAMILIES}[family]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    values = {
        "vocab_size": 256,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    values.update(extra)
    values.update(overrides or {})
    if "layer_types" in values:  # alternate the two kinds over however many layers there are
        values["layer_types"] = [extra["layer_types"][i % 2] for i in range(layers)]
    config = config_cls(**values)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                # a few loud channels make activation-aware methods matter
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
                param[: max(1, hidden // 16)] *= 8.0
            elif name.endswith(".bias"):
                param.copy_(0.02 * torch.randn_like(param))
    model.to(dtype).save_pretrained(folder)
    if tokenizer:
        byte_tokenizer(folder)
    return Path(folder)


def calibration_text(path: Path, chars: int = 20000, seed: int = 0) -> Path:
    """Deterministic pseudo-text: words over a small alphabet, so byte tokens repeat with structure."""
    generator = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "layer", "scale", "merge", "token", "group", "zero", "the", "of"]
    picks = torch.randint(0, len(words), (chars // 5,), generator=generator).tolist()
    text = " ".join(words[i] for i in picks)
    Path(path).write_text(text[:chars])
    return Path(path)


def int4_options(method: str, **kw):
    """The options an export by `method` takes: the gptq or awq target's own dataclass (its defaults), or the plain
    Int4Options of the RTN baseline."""
    from exporters.int4.options import AwqOptions, GptqOptions, Int4Options

    if method == "rtn":
        return Int4Options(method="rtn", **kw)
    return {"gptq": GptqOptions, "awq": AwqOptions}[method](**kw)


def options_for(method: str, **values):
    """The int4 options of `method`: GptqOptions / AwqOptions (their targets' defaults), Int4Options for RTN."""
    from exporters.int4.options import AwqOptions, GptqOptions, Int4Options

    if method == "gptq":
        return GptqOptions(**values)
    if method == "awq":
        return AwqOptions(**values)
    return Int4Options(method=method, **values)
