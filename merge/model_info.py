"""What the merge needs to know about a base architecture, read from a weightless (meta device) model.

Which modules are Linear, GPT-2 style Conv1D (weights stored transposed) or Embedding, which tensors are
the input and output embeddings, whether they are tied, and which Linear layers bitsandbytes would quantize.
Building the model on the meta device allocates no weights. When transformers does not know the
architecture, names and the adapter's own config are used instead.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

INPUT_EMBEDDING_GUESSES = (
    "model.embed_tokens",
    "transformer.wte",
    "model.decoder.embed_tokens",
    "embed_tokens",
    "wte",
    "transformer.word_embeddings",
    "gpt_neox.embed_in",
)
OUTPUT_EMBEDDING_GUESSES = ("lm_head", "embed_out")


@dataclass
class ModelInfo:
    kinds: dict[str, str] = field(default_factory=dict)  # module name -> linear | conv1d | embedding | other
    input_embedding: str | None = None  # module name
    output_embedding: str | None = None  # module name
    tied: bool = False
    not_quantized: list[str] = field(default_factory=list)  # module name fragments bnb keeps in full precision
    from_meta_model: bool = False

    def kind(self, module: str) -> str | None:
        return self.kinds.get(module)


def describe(config: dict, tensor_names: list[str]) -> ModelInfo:
    """ModelInfo for a checkpoint with this config.json content and these tensor names."""
    cfg = copy.deepcopy(config)
    cfg.pop("quantization_config", None)
    tied_flag = _tied_flag(cfg)
    try:
        info = _from_meta_model(cfg)
    except Exception as err:  # noqa: BLE001 - unknown or custom architectures land here
        log.debug("could not build a meta model (%s); using tensor names", err)
        info = _from_names(tensor_names)
    names = set(tensor_names)
    out_w = f"{info.output_embedding}.weight" if info.output_embedding else None
    in_w = f"{info.input_embedding}.weight" if info.input_embedding else None
    # tied: the config says so, or the checkpoint simply has no output embedding of its own
    info.tied = bool(in_w and out_w and in_w in names and (tied_flag or out_w not in names))
    return info


def _tied_flag(cfg: dict) -> bool:
    if "tie_word_embeddings" in cfg:
        return bool(cfg["tie_word_embeddings"])
    text = cfg.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return False


def _from_meta_model(cfg: dict) -> ModelInfo:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model_type = cfg.get("model_type")
    hf_config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    info = ModelInfo(from_meta_model=True)
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            info.kinds[name] = "conv1d"
        elif isinstance(module, torch.nn.Linear):
            info.kinds[name] = "linear"
        elif isinstance(module, torch.nn.Embedding):
            info.kinds[name] = "embedding"
        elif name:
            info.kinds[name] = "other"
    by_id = {id(m): n for n, m in model.named_modules()}
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    info.input_embedding = by_id.get(id(inp)) if inp is not None else None
    info.output_embedding = by_id.get(id(out)) if out is not None else None
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        info.not_quantized = list(get_keys_to_not_convert(model))
    except Exception:  # noqa: BLE001
        info.not_quantized = [info.output_embedding] if info.output_embedding else []
    return info


def _from_names(tensor_names: list[str]) -> ModelInfo:
    info = ModelInfo()
    modules = {n.rsplit(".", 1)[0] for n in tensor_names if n.endswith(".weight")}
    for guess in INPUT_EMBEDDING_GUESSES:
        if guess in modules:
            info.input_embedding = guess
            break
    for guess in OUTPUT_EMBEDDING_GUESSES:
        if guess in modules or info.input_embedding:
            info.output_embedding = guess
            break
    if info.input_embedding:
        info.kinds[info.input_embedding] = "embedding"
    if info.output_embedding:
        info.kinds[info.output_embedding] = "linear"
    info.not_quantized = [info.output_embedding] if info.output_embedding else []
    return info
