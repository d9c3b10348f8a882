"""Forward passes one decoder layer at a time, for evaluation (exporters/evaluate.py) and merge validation
and target choice (merge/validate.py, merge/target.py).

Each decoder layer is the model's own decoder-layer class from transformers, built on the meta device and
filled from the files (the Llama-like layouts of mergeq/core/arch.py), with the rotary embeddings and masks
computed as the model does:

1. the embedding rows of the input tokens are gathered from the checkpoint, a block of rows at a time;
2. for each decoder layer: its tensors are read from disk (mergeq.core.checkpoint's reader; int4 linears unpacked
   from the files as written, by exporters/streaming.py), the layer is built, every sequence goes through it,
   the layer is freed;
3. the final norm, then logits against the output embedding read in blocks of rows.

Peak memory is one layer in fp32 plus the activations, whatever the depth. Computation is fp32 on
`device`; tensors move to the device one layer at a time.

A weight source is anything with `names()` and `get(name)` (an fp32-convertible tensor) plus `row_blocks`
for the embedding matrices: `CheckpointWeights` (a Hugging Face checkpoint) here, `Int4Weights` (AWQ, GPTQ,
compressed-tensors) in exporters/streaming.py, the unmerged base + adapter in merge/validate.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mergeq.core.arch import Architecture, architecture_of
from mergeq.core.checkpoint import Checkpoint
from mergeq.core.errors import MergeqError
from mergeq.core.memory import release_freed_memory
from mergeq.core.modelfiles import read_model_config

log = logging.getLogger(__name__)

ROW_BLOCK_BYTES = 16 << 20  # embedding / lm_head rows read at once (in their stored dtype; fp32 twice that)
LOGITS_BUDGET_BYTES = 256 << 20  # fp32 logits held at once while projecting on the output embedding

LayerHook = Callable[[int, nn.Module], nn.Module]  # (layer index, built layer) -> the layer to run


def supported(config: dict) -> bool:
    """True when the architecture has a layer mapping (mergeq/core/arch.py) the stream can use."""
    try:
        architecture_of(config)
    except MergeqError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ weights


class CheckpointWeights:
    """The tensors of a Hugging Face checkpoint folder (safetensors or .bin), read one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.checkpoint = Checkpoint(self.folder)

    def names(self) -> list[str]:
        return self.checkpoint.names()

    def __contains__(self, name: str) -> bool:
        return name in self.checkpoint

    def get(self, name: str) -> torch.Tensor:
        return self.checkpoint.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.checkpoint.info(name)[1])

    def row_blocks(self, name: str, max_bytes: int = ROW_BLOCK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
        return row_blocks(self.checkpoint, name, max_bytes)

    def close(self) -> None:
        self.checkpoint.close()


def row_blocks(
    checkpoint: Checkpoint, name: str, max_bytes: int = ROW_BLOCK_BYTES
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) of a 2-D tensor, about `max_bytes` at a time, without reading all of it.

    The rows are read-only views into the file (for safetensors): use them before the next block."""
    dtype, shape = checkpoint.info(name)
    if len(shape) != 2:
        raise MergeqError(f"tensor {name} in {checkpoint.folder} has shape {list(shape)}, expected 2 dimensions")
    row_bytes = shape[1] * torch.empty((), dtype=dtype).element_size()
    rows = max(1, max_bytes // max(1, row_bytes))
    first = 0
    for piece in checkpoint.chunks(name, rows * row_bytes):
        block = piece.view(-1, shape[1])
        yield first, block
        first += block.shape[0]


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class StreamedModel:
    """A causal LM as an architecture, a config and a weight source: nothing is held between layers."""

    weights: CheckpointWeights
    config: dict  # config.json
    device: torch.device
    hook: LayerHook | None = None  # e.g. merge validation puts the unmerged adapters into each layer
    # linear weights stay as stored (fp16/bf16) and become fp32 only during their call: half the layer's memory,
    # for one cast per call (worth it when each layer is called once, as in merge validation)
    linears_as_stored: bool = False

    def __post_init__(self):
        self.arch: Architecture = architecture_of(self.config)
        self.hf_config = hf_config_of(self.weights.folder)
        if hasattr(self.hf_config, "quantization_config"):  # the weights arrive unpacked, in fp32
            del self.hf_config.quantization_config
        self.layers = int(self.config["num_hidden_layers"])

    @property
    def head_name(self) -> str:
        """The output embedding; a tied model (or a file without lm_head) projects on the input embedding."""
        if self.arch.lm_head in self.weights and not getattr(self.hf_config, "tie_word_embeddings", False):
            return self.arch.lm_head
        return self.arch.embed

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 embeddings [*ids.shape, hidden] of token ids, gathering only the rows used."""
        return gather_rows(self.weights, self.arch.embed, ids).to(self.device)

    def layer(self, index: int) -> nn.Module:
        layer = load_layer(
            self.weights, self.arch, self.hf_config, index, self.device, linears_as_stored=self.linears_as_stored
        )
        return self.hook(index, layer) if self.hook is not None else layer

    def final_norm(self) -> nn.Module:
        """The model's own final-norm module (from a meta-device skeleton of the whole model), filled from disk."""
        from transformers import AutoModelForCausalLM

        module_name = self.arch.final_norm.rpartition(".")[0]
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.hf_config)
        norm = skeleton.get_submodule(module_name)
        prefix = module_name + "."
        state = {
            n[len(prefix) :]: self.weights.get(n).to(device=self.device, dtype=torch.float32)
            for n in self.weights.names()
            if n.startswith(prefix)
        }
        norm.load_state_dict(state, strict=True, assign=True)
        return norm.eval()

    def close(self) -> None:
        self.weights.close()


def gather_rows(weights, name: str, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a 2-D tensor as fp32, read a block of rows at a time."""
    flat = ids.reshape(-1).to(device="cpu", dtype=torch.int64)  # the rows are read on the CPU
    unique, inverse = torch.unique(flat, return_inverse=True)
    out = None
    found = torch.zeros(unique.shape[0], dtype=torch.bool)
    for first, block in weights.row_blocks(name):
        inside = (unique >= first) & (unique < first + block.shape[0])
        if out is None:
            out = torch.empty(unique.shape[0], block.shape[1], dtype=torch.float32)
        if bool(inside.any()):
            out[inside] = block[unique[inside] - first].to(torch.float32)
            found |= inside
    if out is None or not bool(found.all()):
        missing = unique[~found][:5].tolist()
        raise MergeqError(
            f"token ids {missing} are outside {name} of {weights.folder}",
            hint="evaluate with the tokenizer of the checkpoint (the reference's vocabulary)",
        )
    return out[inverse].view(*ids.shape, out.shape[1])


def final_hidden(
    model: StreamedModel, tokens: torch.Tensor, positions: slice, batch: int = 1, progress: str | None = None
) -> torch.Tensor:
    """Hidden states after the final norm at `positions` of every sequence: fp32 [N, P, hidden] on the device.

    `tokens`: int64 [N, L]. The N sequences go through each layer `batch` at a time."""
    return final_hidden_groups(model, [(tokens, positions)], batch, progress)[0]


def final_hidden_groups(
    model: StreamedModel, groups: list[tuple[torch.Tensor, slice]], batch: int = 1, progress: str | None = None
) -> list[torch.Tensor]:
    """final_hidden for several groups of sequences (each group one length), all through each layer in turn,
    so every layer is read once."""
    from mergeq.core.progress import track

    rotary = []
    hidden = []
    for tokens, _ in groups:
        seq_len = tokens.shape[1]
        hidden.append(model.embed(tokens))
        rotary.append(rotary_embeddings(model.arch, model.hf_config, seq_len, model.device))
    step = max(1, batch)
    indices = range(model.layers)
    for index in track(indices, progress) if progress else indices:
        layer = model.layer(index)  # built outside inference mode: a hook may still set up parameters
        model.weights.close()  # unmap what this layer read: resident memory stays one layer deep
        with torch.inference_mode():
            for h, position_embeddings in zip(hidden, rotary):
                for start in range(0, h.shape[0], step):
                    h[start : start + step] = layer_forward(
                        layer, h[start : start + step], model.arch, position_embeddings
                    )
        del layer
        release_freed_memory()
    norm = model.final_norm()
    model.weights.close()
    with torch.inference_mode():
        return [norm(h[:, positions]).contiguous() for h, (_, positions) in zip(hidden, groups)]


def logits_blocks(model: StreamedModel, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first sequence, fp32 logits [g, P, vocab]) for groups of the final hidden states [N, P, hidden].

    The output embedding is read a block of rows at a time (once per group); a group's logits stay within
    LOGITS_BUDGET_BYTES where one sequence allows it."""
    n, positions, _ = hidden.shape
    vocab = model.weights.shape(model.head_name)[0]
    group = max(1, LOGITS_BUDGET_BYTES // max(1, positions * vocab * 4))
    with torch.inference_mode():
        for start in range(0, n, group):
            h = hidden[start : start + group]
            logits = torch.empty(h.shape[0], positions, vocab, dtype=torch.float32, device=h.device)
            for first, block in model.weights.row_blocks(model.head_name):
                w = block.to(device=h.device, dtype=torch.float32)
                logits[:, :, first : first + w.shape[0]] = h @ w.T
                del w
            model.weights.close()
            yield start, logits


@contextlib.contextmanager
def streamed(
    weights: CheckpointWeights, device: torch.device, hook: LayerHook | None = None, *, linears_as_stored: bool = False
):
    """A StreamedModel of a weight source (the config.json of its folder), closed on exit."""
    model = StreamedModel(weights, read_model_config(weights.folder), device, hook, linears_as_stored)
    try:
        yield model
    finally:
        model.close()


# ------------------------------------------------------------------------------------------------ one layer


def hf_config_of(model_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    config._attn_implementation = "sdpa"
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _mask_for(attention: nn.Module, seq_len: int, device) -> torch.Tensor | None:
    """None (causal) unless the layer has a sliding window shorter than the samples."""
    window = getattr(attention, "sliding_window", None)
    if not window or window >= seq_len:
        return None
    i = torch.arange(seq_len, device=device)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return allowed[None, None]


def layer_forward(layer: nn.Module, h: torch.Tensor, arch: Architecture, position_embeddings) -> torch.Tensor:
    """One hand-built decoder layer on hidden states [N, L, hidden] (causal; a sliding window where it has one)."""
    mask = _mask_for(layer.get_submodule(arch.attention), h.shape[1], h.device)
    out = layer(h, attention_mask=mask, position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out


def load_layer(
    source, arch: Architecture, hf_config, index: int, device, *, linears_as_stored: bool = False
) -> nn.Module:
    """Decoder layer `index` of the family's class, built on the meta device and filled (fp32) from `source`.

    `linears_as_stored`: the weights of its nn.Linear modules keep the 16-bit dtype `source.get` gives them and
    are cast to fp32 for the length of each call (the same fp32 values, so the same results)."""
    decoder_cls, _ = arch.classes()
    prefix = arch.layer_prefix(index)
    with torch.device("meta"):
        layer = decoder_cls(hf_config, layer_idx=index)
    stored = set()
    if linears_as_stored:
        stored = {f"{name}.weight" for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
    state = {}
    for name in source.names():
        if name.startswith(prefix):
            local = name[len(prefix) :]
            tensor = source.get(name)
            keep = local in stored and tensor.dtype in (torch.float16, torch.bfloat16)
            state[local] = tensor.to(device=device, dtype=None if keep else torch.float32)
    try:
        layer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise MergeqError(f"decoder layer {index} ({prefix}*) does not match {arch.decoder_class}: {exc}") from exc
    for module in layer.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype != torch.float32:
            _fp32_while_called(module)
    return layer.eval()


def _fp32_while_called(linear: nn.Linear) -> None:
    """Give `linear` an fp32 copy of its 16-bit weight for each call, and its stored weight back afterwards."""
    stored = linear.weight

    def before(module, args):
        module.weight = nn.Parameter(stored.to(torch.float32), requires_grad=False)

    def after(module, args, output):
        module.weight = stored

    linear.register_forward_pre_hook(before)
    linear.register_forward_hook(after)


def rotary_embeddings(arch: Architecture, hf_config, seq_len: int, device):
    _, rotary_cls = arch.classes()
    rotary = rotary_cls(config=hf_config).to(device)
    position_ids = torch.arange(seq_len, device=device)[None, :]
    dummy = torch.zeros(1, seq_len, 1, dtype=torch.float32, device=device)
    with torch.inference_mode():
        return rotary(dummy, position_ids)
