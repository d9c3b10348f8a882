"""Tiny random models and adapters built in the test, in seconds (shared by the test modules)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def tiny_llama(
    folder: Path,
    *,
    tie: bool = False,
    vocab: int = 96,
    layers: int = 2,
    hidden: int = 32,
    intermediate: int = 64,
    dtype=torch.float32,
    seed: int = 0,
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    return Path(folder)


SP_CORPUS = "\n".join(
    f"the quick brown fox {i} jumps over the lazy dog number {i * 7} and then sleeps" for i in range(300)
)


def sentencepiece_tokenizer(
    folder: Path, *, vocab: int = 320, chat_template: str | None = None, symbols: tuple[str, ...] = ()
) -> Path:
    """A SentencePiece (LlamaTokenizer) tokenizer trained here, with byte fallback: llama.cpp's converter reads it
    (it refuses byte-level BPE tokenizers it has no pre-tokenizer hash for). `vocab` >= 320: 256 byte tokens
    (llama.cpp needs a newline token) + pieces. Token ids: <unk> 0, <s> 1, </s> 2, then `symbols` (user-defined
    pieces, e.g. a special token the family's llama.cpp vocabulary looks up)."""
    import io
    import json

    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS.splitlines()),
        model_writer=model_file,
        vocab_size=vocab,
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        user_defined_symbols=list(symbols),
    )
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_gpt2(folder: Path, *, vocab: int = 96, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return Path(folder)


def randomize_adapter(model, seed: int = 1) -> None:
    """Make every trainable adapter tensor non-trivial (fresh LoRA B is zero, which would test nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype)
            if "magnitude" in name:
                param.mul_(1 + 0.2 * noise)
            elif "modules_to_save" in name or "trainable_tokens" in name:
                param.add_(0.5 * noise)
            else:
                param.copy_(0.3 * noise)


def make_adapter(base: Path, folder: Path, *, seed: int = 1, resize_to: int | None = None, **lora) -> Path:
    """A PEFT LoRA adapter for `base` with random weights, saved to `folder`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if resize_to:
        torch.manual_seed(seed)
        model.resize_token_embeddings(resize_to, mean_resizing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(**lora))
        randomize_adapter(peft_model, seed)
        peft_model.save_pretrained(folder)
    return Path(folder)
