"""One decoder layer as the int4 engine sees it: its context (options, family, the calls the model made to it),
its units (linears reading one input, quantized as one stacked matrix, or a fused experts module) in the order
its forward uses them, and the capture of a unit's inputs. Left out of the units: routers and gates, the
family's exclusions and the user's patterns (they stay in full precision)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from exporters.int4 import experts as moe
from exporters.int4.families import Family, quantized_linears
from exporters.int4.options import Int4Options
from exporters.int4.quant import QuantizedLinear, QuantScheme, rtn_quantize
from mergeq.core.errors import MergeqError
from mergeq.core.skeleton import LayerCall

METHODS = ("gptq", "awq", "rtn")

__all__ = ["EngineOptions", "LayerContext", "Unit", "find_units"]


@dataclass(frozen=True)
class EngineOptions:
    """What the engine runs: the int4 options as given and the exact scheme planned from them
    (exporters.int4.export.plan); `exclude`: regular expressions on full linear names kept in full precision."""

    given: Int4Options
    scheme: QuantScheme
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise MergeqError(f"unknown int4 method {self.method!r}", hint=f"choose one of {', '.join(METHODS)}")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise MergeqError(f"exclude pattern {pattern!r} is not a regular expression: {exc}") from exc

    @property
    def method(self) -> str:
        return self.given.method


@dataclass
class LayerContext:
    """What quantize_layer needs besides the layer: its family, the options, and the calls the model made to it
    (one per chunk of samples; None for RTN, which runs no data through the layer)."""

    family: Family
    options: EngineOptions | None = None
    layer_index: int = 0
    calls: list[LayerCall] | None = None
    prefix: str = ""  # the layer's name prefix in the checkpoint, for exclusion patterns and messages

    def call(self, layer: nn.Module, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
        return self.calls[chunk](layer, hidden)


@dataclass(frozen=True)
class Unit:
    """Linears reading one input (quantized as one stacked matrix), or a fused experts module."""

    names: tuple[str, ...]
    experts: bool = False

    @property
    def name(self) -> str:
        return self.names[0]


# --------------------------------------------------------------------------------- the layer's linears


def linear(layer: nn.Module, name: str) -> nn.Linear:
    module = layer.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise MergeqError(f"{name} is not a linear layer ({type(module).__name__})")
    return module


def stacked(layer: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    """The unit's weights as one float32 matrix, rows in the order of `names`."""
    return torch.cat([linear(layer, name).weight.detach().to(torch.float32) for name in names], dim=0)


def split(layer: nn.Module, names: tuple[str, ...], quantized: QuantizedLinear) -> dict[str, QuantizedLinear]:
    """A stacked unit's quantization cut back into its linears, whose weights then hold the dequantized values."""
    result = {}
    start = 0
    for name in names:
        module = linear(layer, name)
        rows = module.out_features
        piece = QuantizedLinear(
            codes=quantized.codes[start : start + rows],
            scales=quantized.scales[start : start + rows],
            zeros=quantized.zeros[start : start + rows],
            g_idx=quantized.g_idx.clone(),
            bias=None if module.bias is None else module.bias.detach().clone(),
        )
        module.weight.data.copy_(piece.dequantize(module.weight.dtype))
        result[name] = piece
        start += rows
    return result


def rtn(module: nn.Linear, weight: torch.Tensor, scheme: QuantScheme) -> QuantizedLinear:
    """`weight` (the module's, or a clipped copy) rounded to nearest, with the module's bias."""
    return rtn_quantize(weight, scheme, bias=None if module.bias is None else module.bias.detach().clone())


def check_units(layer: nn.Module, units: list[Unit], scheme: QuantScheme, prefix: str) -> None:
    if scheme.group_size == -1:
        return
    for unit in units:
        if unit.experts:
            module = layer.get_submodule(unit.name)
            sizes = {"gate_up_proj": module.gate_up_proj.shape[-1], "down_proj": module.down_proj.shape[-1]}
        else:
            sizes = {name: linear(layer, name).in_features for name in unit.names}
        for name, in_features in sizes.items():
            if in_features % scheme.group_size:
                raise MergeqError(
                    f"{prefix}{name}: in_features {in_features} is not divisible by --group-size {scheme.group_size}"
                )


def _experts_name(layer: nn.Module, family: Family) -> str | None:
    if family.experts is None:
        return None
    name = family.experts.module
    moe.check_module(layer.get_submodule(name), name)
    return name


def _quantizable(layer: nn.Module, ctx: LayerContext) -> dict[str, nn.Linear]:
    """The layer's linears that get quantized: all but routers/gates and the user's exclusions."""
    family = ctx.family
    _experts_name(layer, family)  # checks the experts module's layout
    user = ctx.options.exclude if ctx.options else ()
    return {
        name: module
        for name, module in quantized_linears(layer, family).items()
        if not any(re.search(p, ctx.prefix + name) for p in user)
    }


def _check_nothing_left(layer: nn.Module, linears: dict[str, nn.Linear], experts: str | None, prefix: str) -> None:
    """Refuse a layer whose large matrices are neither linears nor a known experts module (they would stay
    unquantized without anyone asking for it)."""
    owned = {f"{n}.weight" for n in linears}
    if experts:
        owned |= {f"{experts}.gate_up_proj", f"{experts}.down_proj"}
    for name, parameter in layer.named_parameters():
        if parameter.dim() >= 3 and name not in owned:
            raise MergeqError(
                f"{prefix}{name} is a {parameter.dim()}-D weight ({type(layer).__name__}) the int4 "
                "engine does not know how to quantize: stacked experts need an expert layout",
                hint="add the family to exporters/int4/families.py, or leave this model unquantized",
            )


# ------------------------------------------------------------------------------- units and their inputs


def find_units(layer: nn.Module, hidden: list[torch.Tensor], ctx: LayerContext) -> list[Unit]:
    """The layer's units in the order its forward uses them, from one forward of the first chunk (without
    calibration data: module order, one linear per unit). Linears the forward did not call come last."""
    linears = _quantizable(layer, ctx)
    experts = _experts_name(layer, ctx.family)
    _check_nothing_left(layer, linears, experts, ctx.prefix)
    if not hidden:
        return [Unit((name,)) for name in linears] + ([Unit((experts,), True)] if experts else [])
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_module, args, kwargs):
            if name not in seen:
                seen[name] = first_arg(args, kwargs)

        return hook

    modules = dict(linears) | ({experts: layer.get_submodule(experts)} if experts else {})
    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in modules.items()]
    try:
        with torch.inference_mode():
            ctx.call(layer, hidden[0], 0)
    finally:
        for handle in handles:
            handle.remove()
    order: list[Unit | int] = []  # a unit, or the id of an input whose readers are collected in by_input
    by_input: dict[int, list[str]] = {}
    for name, x in seen.items():
        if name == experts:
            order.append(Unit((name,), True))
        elif id(x) in by_input:
            by_input[id(x)].append(name)
        else:
            by_input[id(x)] = [name]
            order.append(id(x))
    units = [entry if isinstance(entry, Unit) else Unit(tuple(by_input[entry])) for entry in order]
    return units + [Unit((name,)) for name in linears if name not in seen]


class _Reached(Exception):
    """Raised by a capture hook: the rest of the layer's forward is not needed."""


def inputs(layer: nn.Module, module: nn.Module, hidden: list[torch.Tensor], ctx: LayerContext, take) -> None:
    """Run each chunk through the layer until `module` is reached; `take(args, kwargs)` receives its inputs."""

    def hook(_module, args, kwargs):
        take(args, kwargs)
        raise _Reached

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for chunk, h in enumerate(hidden):
            try:
                ctx.call(layer, h, chunk)
            except _Reached:
                pass
    finally:
        handle.remove()


def first_arg(args, kwargs) -> torch.Tensor:
    """A hooked module's input tensor, whether passed by position or by keyword."""
    return args[0] if args else next(iter(kwargs.values()))
