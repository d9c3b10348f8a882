"""The model as transformers defines it, on the meta device, filled one decoder layer at a time from disk.

The skeleton is the whole `AutoModelForCausalLM` built on the meta device (no memory). From it:
- `capture`: the model's own forward runs over the calibration tokens with every decoder layer replaced by a
  recorder, so each layer's inputs (hidden states for the first; for every layer its own keyword arguments:
  position embeddings, attention masks, cache positions) come from the model's code, per layer: families that
  alternate layer types (Gemma 3's sliding and global attention with their own rotary embeddings) get each
  layer's. Only the embedding rows the tokens use are read from disk; the forward stops after the last
  recorder, so the final norm and lm_head are never materialized.
- `load_layer`: one decoder layer materialized from the memory-mapped safetensors (MoE experts stacked from
  their per-expert tensors into transformers' fused layout), and `unload_layer` to free it again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from exporters.int4.checkpoint import TensorSource
from exporters.int4.families import Family
from mergeq.core.errors import MergeqError
from mergeq.core.streaming import hf_config_of


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
    def __init__(self, model_dir: Path, source: TensorSource, family: Family, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.source = source
        self.family = family
        self.device = device
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
        self.layers_name, self.layers = self._find_layers(model_dir)
        self.prefix = self.layers_name + "."

    def _find_layers(self, model_dir: Path) -> tuple[str, nn.ModuleList]:
        text = self.hf_config.get_text_config() if hasattr(self.hf_config, "get_text_config") else self.hf_config
        count = int(text.num_hidden_layers)
        found = [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) == count and name.endswith("layers")
        ]
        if len(found) != 1:
            raise MergeqError(
                f"{model_dir}: cannot tell the decoder layers of {type(self.model).__name__} "
                f"({len(found)} lists of {count} modules)",
                hint="the int4 exporters take decoder-only causal LMs with one list of layers",
            )
        return found[0]

    @property
    def count(self) -> int:
        return len(self.layers)

    def layer_prefix(self, index: int) -> str:
        return f"{self.prefix}{index}."

    # ------------------------------------------------------------------------------------------ capture

    def capture(self, tokens: torch.Tensor, per_chunk: int) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
        """(first layer's inputs as chunks of samples, every layer's calls per chunk)."""
        unique, inverse = torch.unique(tokens, return_inverse=True)
        embedding = self.model.get_input_embeddings()
        embed_name = next(n for n, m in self.model.named_modules() if m is embedding) + ".weight"
        if embed_name not in self.source:
            raise MergeqError(f"the checkpoint has no {embed_name}, the input embedding of {type(self.model).__name__}")
        table = self.source.get(embed_name)
        if int(unique.max()) >= table.shape[0]:
            raise MergeqError(
                f"calibration token id {int(unique.max())} is outside {embed_name} ({table.shape[0]} rows)",
                hint="calibrate with the model's own tokenizer",
            )
        self._materialize_outside_layers()
        # only the rows the tokens use, in float32; the ids are renumbered into them
        embedding.weight = nn.Parameter(table[unique].to(device=self.device, dtype=torch.float32), requires_grad=False)
        del table
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
                "some decoder layers were not called once per calibration chunk",
                hint="this model is not a plain decoder stack",
            )
        return [h.to(torch.float32) for h in hidden], calls

    def _materialize_outside_layers(self) -> None:
        """Non-persistent buffers outside the layers (rotary frequencies, embedding scales), computed the way
        transformers initializes them."""
        layers = set(self.layers.modules())
        for module in self.model.modules():
            if module in layers:
                continue
            _materialize_buffers(self.model, module, self.device)

    # --------------------------------------------------------------------------------------- one layer

    def load_layer(self, index: int) -> nn.Module:
        layer = self.layers[index]
        prefix = self.layer_prefix(index)
        state = {}
        for name in self.source.names():
            if name.startswith(prefix):
                state[name[len(prefix) :]] = self.source.get(name).to(device=self.device, dtype=torch.float32)
        experts = self.family.experts
        if experts is not None:
            state = _stack_experts(state, experts, prefix)
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise MergeqError(
                f"decoder layer {index} ({prefix}*) does not match {type(layer).__name__}: {exc}",
                hint=None
                if experts or not _has_experts(state)
                else "its experts are stored per expert; the family needs an expert layout in "
                "exporters/int4/families.py",
            ) from exc
        for module in layer.modules():
            _materialize_buffers(self.model, module, self.device)
        return layer.eval()

    def unload_layer(self, index: int) -> None:
        self.layers[index] = self.layers[index].to("meta")

    def disk_name(self, name: str) -> str:
        """A tensor name inside a layer as the checkpoint (and vLLM) spells it."""
        return self.family.experts.to_disk(name) if self.family.experts else name


def _materialize_buffers(model: nn.Module, module: nn.Module, device) -> None:
    meta = [name for name, buffer in module.named_buffers(recurse=False) if buffer is not None and buffer.is_meta]
    if not meta:
        return
    for name in meta:
        setattr(module, name, torch.empty_like(getattr(module, name), device=device))
    with torch.no_grad():
        model._init_weights(module)


def module_state_dict(state: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """A state dict with checkpoint names -> transformers' module names (a MoE family's per-expert tensors
    stacked into its fused experts parameters); unchanged for families without experts."""
    if family.experts is None:
        return state
    layers: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for name, tensor in state.items():
        match = _LAYER.match(name)
        if match:
            layers.setdefault(match.group(1), {})[name[match.end(1) :]] = tensor
        else:
            out[name] = tensor
    for prefix, layer_state in layers.items():
        out |= {prefix + n: t for n, t in _stack_experts(layer_state, family.experts, prefix).items()}
    return out


_LAYER = re.compile(r"^(.*\.layers\.\d+\.)")


def _has_experts(state: dict) -> bool:
    return any(".experts.0." in name for name in state)


def _stack_experts(state: dict[str, torch.Tensor], layout, prefix: str) -> dict[str, torch.Tensor]:
    """Per-expert gate/up/down weights -> the fused gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    disk = layout.disk + "."
    per_expert: dict[int, dict[str, torch.Tensor]] = {}
    out = {}
    for name, tensor in state.items():
        if name.startswith(disk):
            index, _, rest = name[len(disk) :].partition(".")
            per_expert.setdefault(int(index), {})[rest] = tensor
        else:
            out[layout.to_module(name)] = tensor
    if not per_expert:
        raise MergeqError(f"{prefix}{layout.disk}.*: no expert tensors found")
    count = max(per_expert) + 1
    gate_up, down = [], []
    for e in range(count):
        parts = per_expert.get(e, {})
        try:
            gate_up.append(torch.cat([parts[f"{layout.gate}.weight"], parts[f"{layout.up}.weight"]], dim=0))
            down.append(parts[f"{layout.down}.weight"])
        except KeyError as exc:
            raise MergeqError(f"{prefix}{layout.disk}.{e}: missing {exc.args[0]}") from None
    out[f"{layout.module}.gate_up_proj"] = torch.stack(gate_up)
    out[f"{layout.module}.down_proj"] = torch.stack(down)
    return out
