"""One decoder layer quantized in place, by RTN, GPTQ or AWQ (the units and their inputs: exporters/int4/layer.py;
the math: quant.py, gptq.py, awq.py; fused experts: experts.py).

GPTQ is true-sequential inside a layer: each unit's Hessian comes from a forward through the layer with the units
before it already quantized (stopped at the unit); the next layer receives the outputs of the quantized layer.
AWQ runs the float layer once, collecting input statistics per unit, searches the scales, folds them where the
family's map (exporters/int4/families.py) says the math allows, checks the fold left the float output unchanged,
clips and rounds; the next layer receives the float outputs."""

from __future__ import annotations

import logging

import torch
from torch import nn

from exporters.int4 import awq as awq_alg
from exporters.int4 import experts as moe
from exporters.int4.families import Family, Fold, require_awq
from exporters.int4.layer import (
    LayerContext,
    Unit,
    check_units,
    find_units,
    first_arg,
    inputs,
    linear,
    rtn,
    split,
    stacked,
)
from exporters.int4.quant import QuantizedLinear
from mergeq.core.errors import MergeqError

log = logging.getLogger(__name__)

__all__ = ["quantize_layer"]

# the engine's own settings, not options
GPTQ_BLOCK = 128  # GPTQ lazy-batch block
AWQ_GRID = 20  # AWQ alpha grid points in [0, 1)
AWQ_SKETCH_ROWS = 128  # rows of the CountSketch AWQ measures output error against
FOLD_TOLERANCE = 1e-3  # relative output change a fold may cause (float32 reassociation is ~1e-6)


def quantize_layer(layer: nn.Module, hidden: list[torch.Tensor], ctx: LayerContext):
    """Quantize one decoder layer in place (its linears then hold the dequantized weights).

    `hidden`: the layer's inputs as chunks [samples, seq_len, hidden]. Returns (outputs as chunks,
    {name: QuantizedLinear} with names relative to the layer as the checkpoint spells them, info)."""
    method = ctx.options.method
    with torch.inference_mode():
        units = find_units(layer, hidden, ctx)
        check_units(layer, units, ctx.options.scheme, ctx.prefix)
        if method == "gptq":
            return _gptq_layer(layer, hidden, ctx, units)
        if method == "awq":
            return _awq_layer(layer, hidden, ctx, units)
        return _rtn_layer(layer, hidden, ctx, units)


# ----------------------------------------------------------------------------------------------------- RTN


def _rtn_layer(layer, hidden, ctx: LayerContext, units: list[Unit]):
    scheme = ctx.options.scheme
    quantized: dict[str, QuantizedLinear] = {}
    for unit in units:
        if unit.experts:
            module = layer.get_submodule(unit.name)
            per_expert = moe.rtn(module, scheme)
            if hidden:
                for e, (gate_up, down) in per_expert.items():
                    moe._store(module, e, gate_up, down)
            _add_experts(quantized, ctx.family, per_expert)
            continue
        for name in unit.names:
            module = linear(layer, name)
            q = rtn(module, module.weight.detach(), scheme)
            if hidden:  # the quantized layer's outputs are needed only when activations flow
                module.weight.data.copy_(q.dequantize(module.weight.dtype))
            quantized[name] = q
    outputs = [ctx.call(layer, h, i) for i, h in enumerate(hidden)] if hidden else []
    return outputs, quantized, {}


# ---------------------------------------------------------------------------------------------------- GPTQ


def _gptq_layer(layer, hidden: list[torch.Tensor], ctx: LayerContext, units: list[Unit]):
    quantized: dict[str, QuantizedLinear] = {}
    info: dict = {}
    idle_linears = []
    for unit in units:
        where = f"{ctx.prefix}{', '.join(unit.names)} (decoder layer {ctx.layer_index})"
        solve = moe.gptq_solver(ctx.options.scheme, ctx.options.given, GPTQ_BLOCK, where)
        if unit.experts:
            module = layer.get_submodule(unit.name)
            routed = moe.Routed()
            inputs(layer, module, hidden, ctx, routed.add)
            per_expert, idle = moe.gptq(module, routed, ctx.options.scheme, solve)
            _add_experts(quantized, ctx.family, per_expert)
            _idle_note(ctx, idle, info)
            continue
        first = linear(layer, unit.name)

        def feed(add, _first=first):  # the unit's inputs, straight into its Hessian
            inputs(layer, _first, hidden, ctx, lambda args, kwargs: add(first_arg(args, kwargs)))

        q = solve(stacked(layer, unit.names), feed)
        if q is None:
            idle_linears.extend(unit.names)
            for name in unit.names:
                module = linear(layer, name)
                q = rtn(module, module.weight.detach(), ctx.options.scheme)
                module.weight.data.copy_(q.dequantize(module.weight.dtype))
                quantized[name] = q
            continue
        quantized |= split(layer, unit.names, q)
    if idle_linears:
        info["idle_linears"] = idle_linears
        log.warning(
            "decoder layer %d: %s received no calibration input: rounded to nearest",
            ctx.layer_index,
            ", ".join(idle_linears),
        )
    outputs = [ctx.call(layer, h, i) for i, h in enumerate(hidden)]
    return outputs, quantized, info


# ----------------------------------------------------------------------------------------------------- AWQ


def _awq_layer(layer, hidden: list[torch.Tensor], ctx: LayerContext, units: list[Unit]):
    """Statistics from one float forward -> scales searched and folded (checked) -> clipped and rounded."""
    require_awq(ctx.family)
    stats, routed, outputs = _awq_statistics(layer, hidden, ctx, units)
    info: dict = {"alpha": {}, "not_folded": {}}
    scales, sketches = _awq_scale(layer, units, stats, ctx, info)
    if any(a is not None for a in info["alpha"].values()):
        _verify_folds(layer, hidden[0], outputs[0], ctx)
    quantized = _awq_round(layer, units, stats, routed, scales, sketches, ctx, info)
    return outputs, quantized, info


def _awq_statistics(layer, hidden: list[torch.Tensor], ctx: LayerContext, units: list[Unit]):
    """One forward of the float layer: each unit's input statistics (and the routed inputs of fused experts)."""
    device = hidden[0].device
    stats: dict[str, awq_alg.InputStats] = {}
    routed: dict[str, moe.Routed] = {}
    hooks = []
    for index, unit in enumerate(units):
        if unit.experts:
            module = layer.get_submodule(unit.name)
            stats[unit.name] = awq_alg.InputStats(module.gate_up_proj.shape[-1], AWQ_SKETCH_ROWS, device, seed=index)
            routed[unit.name] = moe.Routed()

            def hook(_module, args, kwargs, _stats=stats[unit.name], _routed=routed[unit.name]):
                _stats.add(first_arg(args, kwargs))
                _routed.add(args, kwargs)
        else:
            module = linear(layer, unit.name)
            stats[unit.name] = awq_alg.InputStats(module.in_features, AWQ_SKETCH_ROWS, device, seed=index)

            def hook(_module, args, kwargs, _stats=stats[unit.name]):
                _stats.add(first_arg(args, kwargs))

        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        outputs = [ctx.call(layer, h, i) for i, h in enumerate(hidden)]
    finally:
        for handle in hooks:
            handle.remove()
    return stats, routed, outputs


def _awq_scale(layer, units: list[Unit], stats: dict, ctx: LayerContext, info: dict) -> tuple[dict, dict]:
    """Each unit's input scales searched and folded into its producer, the unit's weights multiplied by them
    (ones where there is no input, no fold in the family's map, or shapes that do not allow it: `info` says why).
    Returns the scales and, for the clip search, each unit's input sketch divided by them."""
    family = ctx.family
    scales: dict[str, torch.Tensor] = {}
    sketches: dict[str, torch.Tensor] = {}
    for unit in units:
        unit_stats = stats[unit.name]
        weight = moe.stacked_gate_up(layer.get_submodule(unit.name)) if unit.experts else stacked(layer, unit.names)
        fold = family.awq_fold(unit.name)
        s = torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)
        why = None
        if unit_stats.count == 0:
            why = "no calibration input"
        elif fold is None:
            why = f"no fold for {unit.name} in the {family.name} map"
        else:
            result = awq_alg.search_scales(weight, unit_stats, ctx.options.scheme, grid=AWQ_GRID)
            why = _fold(layer, fold, result.scales)
            if why is None:
                s = result.scales
                info["alpha"][unit.name] = result.alpha
                if unit.experts:
                    layer.get_submodule(unit.name).gate_up_proj.data.mul_(s[None, None, :])
                else:
                    for name in unit.names:
                        linear(layer, name).weight.data.mul_(s[None, :])
        if why is not None:
            info["alpha"][unit.name] = None
            info["not_folded"][unit.name] = why
        scales[unit.name] = s
        sketches[unit.name] = unit_stats.sketch / s
    return scales, sketches


def _awq_round(layer, units: list[Unit], stats, routed, scales, sketches, ctx: LayerContext, info: dict):
    """The scaled weights clipped where the family allows it, then rounded; fused experts' down projections get
    their own scale search per expert (exporters/int4/experts.py)."""
    scheme = ctx.options.scheme
    quantized: dict[str, QuantizedLinear] = {}
    for index, unit in enumerate(units):
        if unit.experts:
            module = layer.get_submodule(unit.name)
            per_expert, idle, alphas = moe.awq_down(
                module,
                routed[unit.name],
                scheme,
                AWQ_GRID,
                AWQ_SKETCH_ROWS,
                seed=1000 * (index + 1),
                shared=scales[unit.name],
            )
            _add_experts(quantized, ctx.family, per_expert)
            info["expert_down_alpha"] = alphas
            _idle_note(ctx, idle, info)
            continue
        for name in unit.names:
            module = linear(layer, name)
            weight = module.weight.detach().to(torch.float32)
            if ctx.family.clips(name) and stats[unit.name].count:
                bound = awq_alg.search_clip(weight, sketches[unit.name], scheme)
                weight = awq_alg.apply_clip(weight, bound, scheme)
            q = rtn(module, weight, scheme)
            module.weight.data.copy_(q.dequantize(module.weight.dtype))
            quantized[name] = q
    return quantized


def _fold(layer, fold: Fold, s: torch.Tensor) -> str | None:
    """Divide the producer of a unit's input by s; the reason when the shapes do not allow it."""
    producer = layer.get_submodule(fold.into)
    for name in fold.also_scale:
        layer.get_submodule(name).weight.data.mul_(s[None, :])
    if fold.kind == "norm":
        producer.weight.data.div_(s)
        return None
    if fold.kind == "norm_plus_one":
        producer.weight.data.copy_((1 + producer.weight.data) / s - 1)
        return None
    rows = producer.weight.shape[0]
    if rows != fold.chunks * s.shape[0]:
        for name in fold.also_scale:
            layer.get_submodule(name).weight.data.div_(s[None, :])
        return (
            f"{fold.into} has {rows} output rows, not {fold.chunks} x {s.shape[0]} "
            "(fewer key/value heads than query heads): scale not folded"
        )
    producer.weight.data[rows - s.shape[0] :].div_(s[:, None])
    if getattr(producer, "bias", None) is not None:
        producer.bias.data[rows - s.shape[0] :].div_(s)
    return None


def _verify_folds(layer, hidden: torch.Tensor, expected: torch.Tensor, ctx: LayerContext) -> None:
    """The folded float layer must compute what the original did (up to float32 rounding) on nearly every
    token (a MoE router may flip a near-tie); anything else is a wrong fold map."""
    got = ctx.call(layer, hidden, 0)
    error = (got - expected).norm(dim=-1) / expected.norm(dim=-1).clamp(min=1e-6)
    bad = float((error > FOLD_TOLERANCE).float().mean())
    if bad > 0.01:
        raise MergeqError(
            f"AWQ's scale folding changed the output of decoder layer {ctx.layer_index} "
            f"({bad:.1%} of tokens, worst relative change {float(error.max()):.3g}): the "
            f"{ctx.family.name} fold map in exporters/int4/families.py is wrong for this model",
            hint="use GPTQ, which needs no fold map",
        )


# --------------------------------------------------------------------------------------------- fused experts


def _expert_names(family: Family, e: int) -> tuple[str, str, str]:
    layout = family.experts
    return tuple(f"{layout.disk}.{e}.{which}" for which in (layout.gate, layout.up, layout.down))


def _add_experts(quantized: dict, family: Family, per_expert: dict) -> None:
    for e, (gate_up, down) in per_expert.items():
        gate_name, up_name, down_name = _expert_names(family, e)
        quantized[gate_name], quantized[up_name] = moe.split_gate_up(gate_up)
        quantized[down_name] = down


def _idle_note(ctx: LayerContext, idle: list[int], info: dict) -> None:
    if idle:
        info["idle_experts"] = idle
        log.warning(
            "decoder layer %d: experts %s received no calibration tokens: rounded to nearest without calibration",
            ctx.layer_index,
            idle,
        )
