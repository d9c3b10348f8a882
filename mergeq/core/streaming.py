"""Forward passes one decoder layer at a time, for evaluation (exporters/evaluate.py) and merge validation
and target choice (merge/validate.py, merge/target.py), for any decoder-only family transformers defines.

The model is the family's own `AutoModelForCausalLM`, built on the meta device (mergeq/core/skeleton.py, the
int4 engine's skeleton): no architecture table.

1. the model's own forward runs over the token ids with its decoder layers replaced by recorders: the first
   layer's inputs (the embedding rows of the tokens, gathered from the checkpoint a block of rows at a time,
   through the family's own embedding module: Gemma's scaling by sqrt(hidden)) and every layer's own arguments
   (position embeddings, masks: Gemma 3's sliding and global layers each get theirs);
2. for each decoder layer: its tensors are read from disk (mergeq.core.checkpoint's reader; int4 linears
   unpacked from the files as written, by exporters/streaming.py; MoE experts stacked into transformers' fused
   layout), the layer is built, every sequence goes through it with the arguments recorded for it, the layer is
   freed;
3. the decoder's final norm (its own module, filled from disk), then logits against the output embedding (the
   input embedding when tied) read in blocks of rows, soft-capped where the config says so (Gemma 2).

Peak memory is one layer in fp32 plus the activations, whatever the depth. Computation is fp32 on
`device`; tensors move to the device one layer at a time.

A weight source is anything with `names()`, `get(name)` (an fp32-convertible tensor) and `shape(name)`, plus
`row_blocks` for the embedding matrices, and optionally `stored_view(name)`: with `linears_as_stored` on the CPU,
16-bit linear weights are then read in place from the file map (their pages released as they are cast, and after
each call), not copied. `CheckpointWeights` (a Hugging Face checkpoint) here, `Int4Weights` (AWQ, GPTQ,
compressed-tensors) in exporters/streaming.py, the unmerged base + adapter in merge/unmerged.py.

With `linears_as_stored`, peak memory is one fp32 linear weight plus the activations (measured on the 1.1B
benchmark model's validation: 0.49 GiB peak for the whole `mergeq merge`, 0.57 when each layer was copied).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mergeq.core.checkpoint import Checkpoint
from mergeq.core.device import to_fp32_on
from mergeq.core.errors import MergeqError
from mergeq.core.experts import expert_layout_of, has_experts
from mergeq.core.memory import LOGITS_BUDGET_BYTES, release_freed_memory
from mergeq.core.modelfiles import read_model_config
from mergeq.core.skeleton import Skeleton

log = logging.getLogger(__name__)

ROW_BLOCK_BYTES = 16 << 20  # embedding / lm_head rows read at once (in their stored dtype; fp32 twice that)

LayerHook = Callable[[int, nn.Module], nn.Module]  # (layer index, built layer) -> the layer to run


def unsupported_reason(config: dict) -> str | None:
    """Why the stream cannot take this config.json's model, or None when it can."""
    names = config.get("architectures") or []
    if not any(str(name).endswith("ForCausalLM") for name in names):
        return (
            f"architecture {names or config.get('model_type')!r} is not a causal LM class (...ForCausalLM): "
            "other classes (vision-language models) store their decoder layers under other names"
        )
    if has_experts(config) and expert_layout_of(config) is None:
        return f"{names[0]} is a Mixture-of-Experts model whose expert layout on disk is not in mergeq/core/experts.py"
    return None


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

    def stored_view(self, name: str):
        """The tensor as stored, a read-only view of the file, with the function releasing its pages (or None:
        use `get`)."""
        return self.checkpoint.view(name)

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
    """A causal LM as its meta-device skeleton, a config and a weight source: nothing is held between layers."""

    weights: CheckpointWeights
    config: dict  # config.json
    device: torch.device
    hook: LayerHook | None = None  # e.g. merge validation puts the unmerged adapters into each layer
    # linear weights stay as stored (fp16/bf16) and become fp32 only during their call: half the layer's memory,
    # for one cast per call (worth it when each layer is called once, as in merge validation)
    linears_as_stored: bool = False

    def __post_init__(self):
        why = unsupported_reason(self.config)
        if why is not None:
            raise MergeqError(f"{self.weights.folder}: cannot run one decoder layer at a time: {why}")
        self.skeleton = Skeleton(self.weights.folder, self.weights, self.device, expert_layout_of(self.config))
        self.hf_config = self.skeleton.hf_config
        self.layers = self.skeleton.count

    def layer_prefix(self, index: int) -> str:
        return self.skeleton.layer_prefix(index)

    @property
    def head_name(self) -> str:
        """The output embedding; a tied model (or a file without lm_head) projects on the input embedding."""
        head = self.skeleton.output_embedding
        if head and head in self.weights and not getattr(self.hf_config, "tie_word_embeddings", False):
            return head
        return self.skeleton.input_embedding

    @property
    def logit_softcap(self) -> float | None:
        """Gemma 2's final soft-capping of the logits (cap * tanh(logits / cap)), when the config has it."""
        return getattr(self.skeleton.text_config, "final_logit_softcapping", None) or None

    def layer(self, index: int) -> nn.Module:
        layer = self.skeleton.load_layer(index, linears_as_stored=self.linears_as_stored)
        return self.hook(index, layer) if self.hook is not None else layer

    def final_norm(self) -> nn.Module:
        return self.skeleton.final_norm()

    def close(self) -> None:
        self.weights.close()
        self.skeleton.scratch.release()


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

    step = max(1, batch)
    hint = "evaluate with the tokenizer of the checkpoint (the reference's vocabulary)"
    captured = [model.skeleton.capture(tokens, step, hint=hint) for tokens, _ in groups]
    hidden = [chunks for chunks, _ in captured]
    calls = [group_calls for _, group_calls in captured]
    del captured
    indices = range(model.layers)
    for index in track(indices, progress) if progress else indices:
        layer = model.layer(index)  # built outside inference mode: a hook may still set up parameters
        model.weights.close()  # unmap what this layer read: resident memory stays one layer deep
        with torch.inference_mode():
            for chunks, group_calls in zip(hidden, calls):
                for c, call in enumerate(group_calls[index]):
                    chunks[c] = call(layer, chunks[c])
                group_calls[index] = []  # its masks and position embeddings are no longer needed
        del layer
        release_freed_memory()
    model.skeleton.scratch.release()  # the layers' fp32 weight buffer: not needed for the norm and the logits
    norm = model.final_norm()
    model.weights.close()
    with torch.inference_mode():
        return [
            torch.cat([norm(h[:, positions]) for h in chunks]).contiguous()
            for chunks, (_, positions) in zip(hidden, groups)
        ]


def logits_blocks(model: StreamedModel, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first sequence, fp32 logits [g, P, vocab]) for groups of the final hidden states [N, P, hidden].

    The output embedding is read a block of rows at a time (once per group); a group's logits stay within
    LOGITS_BUDGET_BYTES where one sequence allows it."""
    n, positions, _ = hidden.shape
    vocab = model.weights.shape(model.head_name)[0]
    group = max(1, LOGITS_BUDGET_BYTES // max(1, positions * vocab * 4))
    cap = model.logit_softcap
    with torch.inference_mode():
        for start in range(0, n, group):
            h = hidden[start : start + group]
            logits = torch.empty(h.shape[0], positions, vocab, dtype=torch.float32, device=h.device)
            for first, block in model.weights.row_blocks(model.head_name):
                w = to_fp32_on(block, h.device)
                logits[:, :, first : first + w.shape[0]] = h @ w.T
                del w
            model.weights.close()
            if cap:
                logits.div_(cap).tanh_().mul_(cap)
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
