"""The demo's QLoRA twin and adapter: NF4-quantize the base, QLoRA-train a LoRA on it on the CPU, measure it.

Everything here is seeded and runs single-process on the CPU; the numbers it measures go to demo_facts.json.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from mergeq.core.errors import MergeqError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 1234
    rank: int = 16
    alpha: int = 32  # alpha != rank on purpose: the scale alpha/r = 2 must be applied by every merge
    steps: int = 64  # about 1 s/step on an idle 2-core CPU; several times that on a busy one
    batch_size: int = 4
    block_tokens: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 6
    weight_decay: float = 0.0


@dataclass(frozen=True)
class EvalSettings:
    context: int = 512  # tokens per window (non-overlapping windows over the start of the text)
    max_tokens: int = 4096  # tokens of the evaluation text scored for the recorded numbers
    batch_size: int = 4


def nf4_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,  # CPU: fp32 compute is the fast and exact path
    )


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def build_base_nf4(base: Path, out: Path) -> dict:
    """Save `base` as transformers + bitsandbytes would for a QLoRA user: NF4, double quant, 4-bit."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=nf4_config(), dtype=torch.float16, device_map="cpu"
    )
    model.save_pretrained(out)
    copy_tokenizer(base, out)
    quantized = sorted(name for name, module in model.named_modules() if type(module).__name__ == "Linear4bit")
    return {"quantized_linear_layers": len(quantized), "quant_type": "nf4", "double_quant": True}


def load_nf4_for_training(base_nf4: Path, *, dequantize: bool = True):
    """The 4-bit base on the CPU, frozen, with its non-quantized weights (embeddings, norms) in fp32.

    With `dequantize`, each frozen bitsandbytes Linear4bit becomes a plain fp32 Linear holding its
    dequantized weight. That is exactly the product bitsandbytes computes on the CPU in training mode
    (it dequantizes the NF4 weight to the fp32 compute dtype on every call; checked bit for bit in the
    tests), done once instead of every step. It also avoids bitsandbytes' CPU inference path, which
    repacks the weight for a bf16 kernel and gives different (less exact) logits than training saw.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_nf4, dtype=torch.float32, device_map="cpu")
    if dequantize:
        replace_4bit_linears(model)
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)
    return model


def dequantized_weight(linear4bit):
    """The fp32 weight that a bitsandbytes Linear4bit multiplies with when its compute dtype is fp32."""
    import copy

    import bitsandbytes.functional as bnbf
    import torch

    state = copy.copy(linear4bit.weight.quant_state)
    state.dtype = torch.float32  # dequantize straight to fp32, as the training matmul does (no fp16 rounding)
    return bnbf.dequantize_4bit(linear4bit.weight.data, state)


def replace_4bit_linears(model) -> int:
    import torch

    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child).__name__ != "Linear4bit":
                continue
            linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            linear.weight = torch.nn.Parameter(dequantized_weight(child), requires_grad=False)
            if child.bias is not None:
                linear.bias = torch.nn.Parameter(child.bias.detach().float(), requires_grad=False)
            setattr(module, child_name, linear)
            replaced += 1
    return replaced


def token_stream(tokenizer, text: str):
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def train_blocks(tokens, settings: TrainSettings):
    """The training batches: shuffled, non-overlapping blocks of the token stream, in a seeded order."""
    import torch

    count = tokens.numel() // settings.block_tokens
    needed = settings.steps * settings.batch_size
    if count < needed:
        raise MergeqError(
            f"the demo training text has {count} blocks of {settings.block_tokens} tokens; {needed} needed"
        )
    blocks = tokens[: count * settings.block_tokens].view(count, settings.block_tokens)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(settings.seed))[:needed]
    return blocks[order].view(settings.steps, settings.batch_size, settings.block_tokens)


def train_adapter(base_nf4: Path, train_text: str, out: Path, settings: TrainSettings) -> dict:
    """QLoRA-train a LoRA adapter on the 4-bit base; save it in `out`; return the loss curve summary."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from mergeq.core.progress import progress_bar

    seed_everything(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_nf4)
    batches = train_blocks(token_stream(tokenizer, train_text), settings)
    model = load_nf4_for_training(base_nf4)
    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(settings.seed)  # LoRA A matrices are initialized from the global generator
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 10%
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses: list[float] = []
    with progress_bar() as bar:
        task = bar.add_task("QLoRA training (loss -)", total=settings.steps)
        for step in range(settings.steps):
            batch = batches[step]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            recent = sum(losses[-10:]) / len(losses[-10:])
            bar.update(task, advance=1, description=f"QLoRA training (loss {recent:.3f})")
            if (step + 1) % 16 == 0:  # also in the log, for runs without a terminal (CI)
                log.info("QLoRA step %d/%d: loss %.4f", step + 1, settings.steps, recent)
    model.eval()
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub; it says nothing about this adapter
    # what a trainer leaves beside a QLoRA adapter (axolotl, a Trainer saving the model config): the trained
    # model's config.json, whose quantization_config says NF4 with double quantization
    shutil.copyfile(Path(base_nf4) / "config.json", out / "config.json")
    head, tail = losses[:10], losses[-10:]
    return {
        "settings": asdict(settings),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "loss_first10": round(sum(head) / len(head), 4),
        "loss_last10": round(sum(tail) / len(tail), 4),
        "train_tokens": settings.steps * settings.batch_size * settings.block_tokens,
    }


def perplexity(model, tokenizer, text: str, settings: EvalSettings) -> dict:
    """Perplexity over non-overlapping windows of the first `max_tokens` tokens of `text`."""
    import torch

    tokens = token_stream(tokenizer, text)
    windows = min(tokens.numel(), settings.max_tokens) // settings.context
    if windows == 0:
        raise MergeqError(
            f"the evaluation text has {tokens.numel()} tokens, fewer than one {settings.context}-token window"
        )
    blocks = tokens[: windows * settings.context].view(windows, settings.context)
    total_nll, scored = 0.0, 0
    with torch.inference_mode():
        for start in range(0, windows, settings.batch_size):
            batch = blocks[start : start + settings.batch_size]
            logits = model(input_ids=batch).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            scored += batch[:, 1:].numel()
    return {"perplexity": round(math.exp(total_nll / scored), 4), "scored_tokens": scored, "context": settings.context}


def measure(base: Path, base_nf4: Path, adapter: Path, eval_text: str, settings: EvalSettings) -> dict:
    """Held-out perplexity of the fp16 base, the 4-bit base, and the 4-bit base with the adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    fp_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_fp = perplexity(fp_model, tokenizer, eval_text, settings)
    del fp_model
    model = PeftModel.from_pretrained(load_nf4_for_training(base_nf4), adapter).eval()
    with model.disable_adapter():
        base_q = perplexity(model, tokenizer, eval_text, settings)
    tuned = perplexity(model, tokenizer, eval_text, settings)
    return {"base_fp16": base_fp, "base_nf4": base_q, "base_nf4_plus_adapter": tuned}
