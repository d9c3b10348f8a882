"""Synthetic Llama-shaped checkpoints and LoRA adapters of any size, for benchmarks and memory tests; also the
Gemma 3 text model of the same widths (Gemma3Shape: q/k norms, sandwich norms, sliding and global layers, the output
embedding tied to the input embedding).

Written tensor by tensor through the sharded writer, so a multi-billion-parameter model is produced
without ever being in memory. Values are seeded per tensor name: the same arguments give the same bytes.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from merge.options import DEFAULT_MAX_SHARD_BYTES
from mergeq.core.shards import OutTensor, ShardWriter

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 32
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}"
            out += [
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.mlp.gate_proj.weight", (i, h)),
                (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def params(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "dtype": dtype,
        }


@dataclass(frozen=True)
class Gemma3Shape(LlamaShape):
    """A Gemma 3 text model (Gemma3ForCausalLM) of Llama widths."""

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        out = [t for t in super().tensors() if t[0] != "lm_head.weight"]  # tied to the input embedding
        for n in range(self.layers):
            p = f"model.layers.{n}"
            out += [(f"{p}.self_attn.{x}_norm.weight", (self.head_dim,)) for x in ("q", "k")]
            out += [(f"{p}.{x}_feedforward_layernorm.weight", (self.hidden,)) for x in ("pre", "post")]
        return out

    def config(self, dtype: str) -> dict:
        return {
            **super().config(dtype),
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": self.head_dim,
            "sliding_window": 16,
            "rope_parameters": None,
            "tie_word_embeddings": True,
        }


def _random(name: str, shape: tuple[int, ...], scale: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def write_llama(
    folder: Path,
    shape: LlamaShape,
    *,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = shape.tensors()
    writer = ShardWriter(folder, max_shard_bytes, plan=[OutTensor(n, dtype, s) for n, s in specs])
    for name, dims in specs:
        norm = name.endswith("norm.weight")
        tensor = torch.ones(dims, dtype=dtype) if norm else _random(name, dims, 0.02, dtype, seed)
        writer.write(name, tensor)
    writer.finish()
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(shape.config(name), indent=2, sort_keys=True) + "\n")
    (folder / "synthetic.json").write_text(json.dumps(asdict(shape), sort_keys=True) + "\n")
    return folder


def write_lora(
    folder: Path,
    shape: LlamaShape,
    base: Path,
    *,
    r: int = 64,
    alpha: int = 128,
    targets: tuple[str, ...] = LINEAR,
    seed: int = 1,
) -> Path:
    """A PEFT-format LoRA adapter (fp32) on `targets` of every layer."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, dims in shape.tensors():
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        out_f, in_f = dims
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = _random(prefix + "A", (r, in_f), 1 / in_f**0.5, torch.float32, seed)
        tensors[f"{prefix}.lora_B.weight"] = _random(prefix + "B", (out_f, r), 0.01, torch.float32, seed)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "base_model_name_or_path": str(base),
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def write_tokenizer(folder: Path, vocab: int, source: Path) -> Path:
    """The byte-level BPE tokenizer of the checkpoint in `source` (the demo base's), cut to the first `vocab` ids
    when the model's vocabulary is smaller: the tokens past it and the merges that make them are dropped, so every
    id it gives is in range. A real checkpoint ships its tokenizer, and the validation tokenizes its prompts with
    it (without one it falls back to random ids, twice as many positions as the prompts tokenize to)."""
    data = json.loads((Path(source) / "tokenizer.json").read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{source}/tokenizer.json: a BPE tokenizer is needed, not {model.get('type')!r}")
    if len(model["vocab"]) > vocab:
        model["vocab"] = {token: i for token, i in model["vocab"].items() if i < vocab}
        kept = model["vocab"]
        pairs = [(pair, pair.split(" ") if isinstance(pair, str) else pair) for pair in model["merges"]]
        model["merges"] = [pair for pair, (a, b) in pairs if a in kept and b in kept and a + b in kept]
        data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab]
    folder = Path(folder)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n")
    config = json.loads((Path(source) / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
