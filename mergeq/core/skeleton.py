"""The model as transformers defines it, on the meta device, filled one decoder layer at a time from disk.

No architecture table: the skeleton is the whole `AutoModelForCausalLM` built on the meta device (no memory),
and everything family-specific comes from running its own modules:
- `capture`: the model's own forward runs over token ids with every decoder layer replaced by a recorder, so
  each layer's inputs (hidden states for the first, after the family's own embedding scaling; for every layer
  its own positional and keyword arguments: position embeddings, attention masks, cache positions) come from
  the model's code, per layer: families that alternate layer types (Gemma 3's sliding and global attention
  with their own rotary embeddings) get each layer's. Only the embedding rows the tokens use are read from
  disk; the forward stops after the last recorder, so the final norm and lm_head are never materialized.
- `load_layer`: one decoder layer materialized from the files (MoE experts stacked from their per-expert
  tensors into transformers' fused layout, mergeq/core/experts.py), a fresh module each call.
- `final_norm`, `input_embedding`, `output_embedding`: what the stream needs after the layers.

Users: the int4 engine (exporters/int4/layerwise.py) and the streamed forward of evaluation and merge
validation (mergeq/core/streaming.py). A weight source is anything with `names()`, `get(name)`,
`__contains__`, `shape(name)` and `close()`; with `row_blocks(name)` the embedding rows are gathered a block of
rows at a time instead of reading the whole table.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mergeq.core.device import to_fp32_on
from mergeq.core.errors import MergeqError
from mergeq.core.experts import ExpertLayout, stack_experts, stored_per_expert


def hf_config_of(model_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    config._attn_implementation = "sdpa"
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def decoder_layers(model: nn.Module, source: Path | str | None = None) -> tuple[str, nn.ModuleList]:
    """The name and the module list of a causal LM's decoder layers: the one ModuleList named `...layers` that
    holds num_hidden_layers modules (of the text config). Refuses a model with none or several such lists;
    `source` (the model's folder) names it in the message."""
    config = model.config
    count = int((config.get_text_config() if hasattr(config, "get_text_config") else config).num_hidden_layers)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count and name.endswith("layers")
    ]
    if len(found) != 1:
        where = f"{source}: " if source is not None else ""
        raise MergeqError(
            f"{where}cannot tell the decoder layers of {type(model).__name__} ({len(found)} lists of {count} modules)",
            hint="layer-by-layer processing takes decoder-only causal LMs with one list of layers",
        )
    return found[0]


class _Stop(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed."""


@dataclass
class LayerCall:
    """What the model passed to one decoder layer for one chunk of samples, hidden states aside."""

    args: tuple  # positional arguments after the hidden states
    kwargs: dict
    hidden_in_kwargs: bool = False

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_in_kwargs:
            out = layer(*self.args, **self.kwargs, hidden_states=hidden)
        else:
            out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


class _Recorder(nn.Module):
    """Stands in for decoder layer `index`: records its call and passes the hidden states through."""

    def __init__(self, original: nn.Module, index: int, last: bool, calls: list[list[LayerCall]]):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: its attributes are looked up
        self.index = index
        self.last = last
        self.calls = calls

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest, in_kwargs = args[0], tuple(args[1:]), False
        else:
            kwargs = dict(kwargs)
            hidden, rest, in_kwargs = kwargs.pop("hidden_states"), (), True
        self.calls[self.index].append(LayerCall(rest, kwargs, in_kwargs))
        if self.index == 0:
            self.calls_hidden.append(hidden)
        if self.last:
            raise _Stop
        return hidden


class Skeleton:
    """`source`: the weight source (None to inspect the structure only); `experts`: how the checkpoint stores
    a MoE family's experts (None for a dense family)."""

    def __init__(self, model_dir: Path, source, device: torch.device, experts: ExpertLayout | None = None):
        from transformers import AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.source = source
        self.experts = experts
        self.device = torch.device(device)
        self.hf_config = hf_config_of(model_dir)
        with torch.device("meta"):
            try:
                self.model = AutoModelForCausalLM.from_config(self.hf_config, dtype=torch.float32)
            except ValueError as exc:  # no SDPA attention in this family (Gemma 2's logit soft-capping): eager
                if "scaled_dot_product_attention" not in str(exc):
                    raise
                self.hf_config._attn_implementation = "eager"
                self.model = AutoModelForCausalLM.from_config(self.hf_config, dtype=torch.float32)
        self.model.eval()
        self.layers_name, self.layers = decoder_layers(self.model, self.model_dir)
        self.prefix = self.layers_name + "."
        self.scratch = Fp32Scratch()  # the fp32 weight of the 16-bit linear running now (linears_as_stored)

    @property
    def text_config(self):
        return self.hf_config.get_text_config() if hasattr(self.hf_config, "get_text_config") else self.hf_config

    @property
    def count(self) -> int:
        return len(self.layers)

    def layer_prefix(self, index: int) -> str:
        return f"{self.prefix}{index}."

    def _module_name(self, module: nn.Module | None) -> str | None:
        return next((n for n, m in self.model.named_modules() if m is module), None) if module is not None else None

    @property
    def input_embedding(self) -> str:
        """The input embedding matrix's name in the checkpoint."""
        return self._module_name(self.model.get_input_embeddings()) + ".weight"

    @property
    def output_embedding(self) -> str | None:
        """The output embedding (lm_head) matrix's name, or None when the model has none."""
        name = self._module_name(self.model.get_output_embeddings())
        return name + ".weight" if name else None

    # ------------------------------------------------------------------------------------------ capture

    def capture(
        self, tokens: torch.Tensor, per_chunk: int, *, hint: str = "calibrate with the model's own tokenizer"
    ) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
        """(first layer's inputs as chunks of `per_chunk` samples, every layer's calls per chunk)."""
        unique, inverse = torch.unique(tokens, return_inverse=True)
        embedding = self.model.get_input_embeddings()
        embed_name = self.input_embedding
        if embed_name not in self.source:
            raise MergeqError(f"the checkpoint has no {embed_name}, the input embedding of {type(self.model).__name__}")
        rows = self.source.shape(embed_name)[0]
        if int(unique.max()) >= rows:
            raise MergeqError(f"token id {int(unique.max())} is outside {embed_name} ({rows} rows)", hint=hint)
        self._materialize_outside_layers()
        # only the rows the tokens use, in float32; the ids are renumbered into them
        embedding.weight = nn.Parameter(self._rows(embed_name, unique), requires_grad=False)
        self.source.close()
        calls: list[list[LayerCall]] = [[] for _ in range(self.count)]
        originals = list(self.layers)
        recorders = [_Recorder(layer, i, i == self.count - 1, calls) for i, layer in enumerate(originals)]
        hidden: list[torch.Tensor] = []
        recorders[0].calls_hidden = hidden
        for i, recorder in enumerate(recorders):
            self.layers[i] = recorder
        try:
            with torch.inference_mode():
                for start in range(0, tokens.shape[0], per_chunk):
                    ids = inverse[start : start + per_chunk].to(self.device)
                    try:
                        self.model(input_ids=ids, use_cache=False)
                    except _Stop:
                        pass
                    else:
                        raise MergeqError(
                            f"{type(self.model).__name__}'s forward did not call its last decoder layer",
                            hint="this model is not a plain decoder stack",
                        )
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
            embedding.weight = nn.Parameter(torch.empty_like(embedding.weight, device="meta"), requires_grad=False)
        if any(len(c) != len(hidden) for c in calls):
            raise MergeqError(
                "some decoder layers were not called once per chunk of samples",
                hint="this model is not a plain decoder stack",
            )
        return [h.to(torch.float32) for h in hidden], calls

    def _rows(self, name: str, unique: torch.Tensor) -> torch.Tensor:
        """fp32 rows `unique` (sorted) of a 2-D tensor, on the device."""
        if not hasattr(self.source, "row_blocks"):
            table = self.source.get(name)
            return to_fp32_on(table[unique.to(table.device)], self.device)
        flat = unique.to(device="cpu", dtype=torch.int64)  # the rows are read on the CPU
        out = None
        for first, block in self.source.row_blocks(name):
            inside = (flat >= first) & (flat < first + block.shape[0])
            if out is None:
                out = torch.empty(flat.shape[0], block.shape[1], dtype=torch.float32)
            if bool(inside.any()):
                out[inside] = block[flat[inside] - first].to(torch.float32)
        return out.to(self.device)

    def _materialize_outside_layers(self) -> None:
        """Non-persistent buffers outside the layers (rotary frequencies, embedding scales), computed the way
        transformers initializes them."""
        layers = set(self.layers.modules())
        for module in self.model.modules():
            if module in layers:
                continue
            _materialize_buffers(self.model, module, self.device)

    # --------------------------------------------------------------------------------------- one layer

    def load_layer(self, index: int, *, linears_as_stored: bool = False) -> nn.Module:
        """Decoder layer `index`, a new module filled (fp32) from the source.

        `linears_as_stored`: the weights of its nn.Linear modules keep the 16-bit dtype `source.get` gives
        them and are cast to fp32 for the length of each call (the same fp32 values, so the same results)."""
        layer = copy.deepcopy(self.layers[index])
        prefix = self.layer_prefix(index)
        stored = set()
        if linears_as_stored:
            stored = {f"{name}.weight" for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
        # on the CPU a stored 16-bit weight is not copied: a view of the file map, its pages released after each call
        viewer = getattr(self.source, "stored_view", None) if self.device.type == "cpu" else None
        experts = self.experts
        state = {}
        releases: dict[str, Callable[..., None]] = {}
        for name in self.source.names():
            if name.startswith(prefix):
                local = name[len(prefix) :]
                module_name = experts.to_module(local) if experts else local
                viewed = viewer(name) if viewer is not None and module_name in stored else None
                if viewed is not None and viewed[0].dtype in (torch.float16, torch.bfloat16):
                    state[local], releases[local.removesuffix(".weight")] = viewed
                    continue
                tensor = self.source.get(name)
                keep = module_name in stored and tensor.dtype in (torch.float16, torch.bfloat16)
                state[local] = tensor.to(self.device) if keep else to_fp32_on(tensor, self.device)
        if experts is not None:
            state = stack_experts(state, experts, prefix)
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise MergeqError(
                f"decoder layer {index} ({prefix}*) does not match {type(layer).__name__}: {exc}",
                hint=None
                if experts or not stored_per_expert(state)
                else "its experts are stored per expert; the family needs an expert layout in mergeq/core/experts.py",
            ) from exc
        for module_name, module in layer.named_modules():
            _materialize_buffers(self.model, module, self.device)
            if isinstance(module, nn.Linear) and module.weight.dtype != torch.float32:
                _fp32_while_called(module, self.scratch, releases.get(module_name))
        return layer.eval()

    def disk_name(self, name: str) -> str:
        """A tensor name inside a layer as the checkpoint (and vLLM) spells it."""
        return self.experts.to_disk(name) if self.experts else name

    # --------------------------------------------------------------------------------- after the layers

    def final_norm(self) -> nn.Module:
        """The norm the decoder applies after its last layer (its `norm` module), filled (fp32) from the source."""
        decoder_name = self.layers_name.rpartition(".")[0]
        decoder = self.model.get_submodule(decoder_name) if decoder_name else self.model
        norm = getattr(decoder, "norm", None)
        if not isinstance(norm, nn.Module):
            raise MergeqError(
                f"{type(decoder).__name__} has no final `norm` module after its decoder layers: the "
                "layer-by-layer forward takes the decoder's final norm from there (every family of the README's "
                "Model families table has one)",
                hint="skip this step for this model (--no-eval, --no-validate)",
            )
        module_name = f"{decoder_name}.norm" if decoder_name else "norm"
        prefix = module_name + "."
        state = {
            n[len(prefix) :]: to_fp32_on(self.source.get(n), self.device)
            for n in self.source.names()
            if n.startswith(prefix)
        }
        norm = copy.deepcopy(norm)
        try:
            norm.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise MergeqError(f"{module_name} does not match {type(norm).__name__}: {exc}") from exc
        for module in norm.modules():
            _materialize_buffers(self.model, module, self.device)
        return norm.eval()


def _materialize_buffers(model: nn.Module, module: nn.Module, device) -> None:
    meta = [name for name, buffer in module.named_buffers(recurse=False) if buffer is not None and buffer.is_meta]
    if not meta:
        return
    for name in meta:
        setattr(module, name, torch.empty_like(getattr(module, name), device=device))
    with torch.no_grad():
        model._init_weights(module)


CAST_BLOCK_BYTES = 4 << 20  # a weight viewed in the file map is cast this many of its bytes at a time


class Fp32Scratch:
    """One fp32 buffer that the 16-bit linears of the layers cast their weight into, one call at a time.

    The same values as a fresh `weight.to(torch.float32)`, without the fresh allocation: glibc maps a new
    allocation this large from the kernel, which zeroes and faults in its pages on every cast (measured on a
    2048x5632 weight: 36 ms cast fresh, 11 ms into memory already in use; the forward's matmul takes 30).
    The buffer grows to the largest such weight; `release` frees it when the pass is over."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def cast(self, weight: torch.Tensor, release: Callable[..., None] | None = None) -> torch.Tensor:
        """`weight` in fp32, in the buffer: valid until the next cast. `release` (a weight viewed in the file
        map): cast CAST_BLOCK_BYTES of it at a time, each block's pages released once cast, so that the weight's
        pages are never all mapped at once."""
        n = weight.numel()
        if self.buffer is None or self.buffer.numel() < n or self.buffer.device != weight.device:
            self.buffer = None  # freed before the larger one is allocated
            self.buffer = torch.empty(n, dtype=torch.float32, device=weight.device)
        out = self.buffer[:n].view(weight.shape)
        if release is None or weight.dim() != 2 or not weight.is_contiguous():
            out.copy_(weight)
            return out
        row_bytes = weight.shape[1] * weight.element_size()
        rows = max(1, CAST_BLOCK_BYTES // max(1, row_bytes))
        for first in range(0, weight.shape[0], rows):
            last = min(weight.shape[0], first + rows)
            out[first:last].copy_(weight[first:last])
            release(first * row_bytes, last * row_bytes)
        return out

    def release(self) -> None:
        self.buffer = None


def _fp32_while_called(linear: nn.Linear, scratch: Fp32Scratch, release: Callable[..., None] | None = None) -> None:
    """Give `linear` its 16-bit weight in fp32 (in `scratch`) for each call, and its stored weight back
    afterwards; `release` (a weight viewed in the file map) then drops the weight's pages from the process."""
    stored = linear.weight

    def before(module, args):
        module.weight = nn.Parameter(scratch.cast(stored, release), requires_grad=False)

    def after(module, args, output):
        module.weight = stored
        if release is not None:
            release()

    linear.register_forward_pre_hook(before)
    linear.register_forward_hook(after)
