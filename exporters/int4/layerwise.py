"""The streaming engine: one decoder layer in memory at a time, for any decoder-only family transformers
defines (exporters/int4/skeleton.py builds the model on the meta device and fills one layer at a time).

1. The model's own forward runs over the calibration tokens with its decoder layers replaced by recorders:
   the first layer's inputs, and what every layer receives (position embeddings, masks, cache positions).
2. For each decoder layer: materialize it from the memory-mapped safetensors, find its linears and the
   order the forward uses them (hooks; linears reading the same input form one unit, a fused experts module
   is one unit), quantize it, hand its tensors to the sink (which writes them under the checkpoint's names),
   free it, and pass its outputs on.
3. The remaining tensors (final norm, lm_head) are copied through unquantized.

Peak memory is one layer plus the calibration activations, whatever the depth.

GPTQ is true-sequential inside a layer: each unit's Hessian comes from a forward through the layer with the
units before it already quantized (stopped at the unit); the next layer receives the outputs of the
quantized layer. AWQ runs the float layer once, collecting input statistics per unit, searches the scales,
folds them where the family's map (exporters/int4/families.py) says the math allows, checks the fold left
the float output unchanged, clips and rounds; the next layer receives the float outputs.
Left in full precision: everything outside the layers (lm_head), routers and gates, user-excluded patterns.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from exporters.int4 import awq as awq_alg
from exporters.int4 import experts as moe
from exporters.int4.checkpoint import TensorSource
from exporters.int4.families import Family, Fold, family_of, require_awq
from exporters.int4.options import Int4Options
from exporters.int4.quant import QuantizedLinear, QuantScheme, rtn_quantize
from exporters.int4.resume import LayerCheckpoints, LayerOutput
from exporters.int4.skeleton import LayerCall, Skeleton
from mergeq.core.arch import Architecture
from mergeq.core.device import resolve_device
from mergeq.core.errors import MergeqError
from mergeq.core.memory import release_freed_memory
from mergeq.core.modelfiles import read_model_config
from mergeq.core.progress import track
from mergeq.core.streaming import layer_forward

log = logging.getLogger(__name__)

METHODS = ("gptq", "awq", "rtn")
FOLD_TOLERANCE = 1e-3  # relative output change a fold may cause (float32 reassociation is ~1e-6)

__all__ = [
    "EngineOptions",
    "LayerContext",
    "quantize_layer",
    "quantize_streaming",
]


# the engine's own settings, not options
GPTQ_BLOCK = 128  # GPTQ lazy-batch block
AWQ_GRID = 20  # AWQ alpha grid points in [0, 1)
AWQ_SKETCH_ROWS = 128  # rows of the CountSketch AWQ measures output error against
CHUNK_TOKENS = 4096  # calibration tokens pushed through a layer at once


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


class Sink(Protocol):
    def linear(self, name: str, quantized: QuantizedLinear) -> None: ...

    def tensor(self, name: str, tensor: torch.Tensor) -> None: ...


@dataclass
class LayerContext:
    """What quantize_layer needs besides the layer: the calls the model made to it (one per chunk), or for
    Llama-like layers built by hand, the rotary embeddings (`arch`, `position_embeddings`)."""

    arch: Architecture | None = None
    options: EngineOptions | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    seq_len: int = 0
    layer_index: int = 0
    family: Family | None = None
    calls: list[LayerCall] | None = None
    prefix: str = ""  # the layer's name prefix in the checkpoint, for exclusion patterns and messages

    def call(self, layer: nn.Module, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
        if self.calls is not None:
            return self.calls[chunk](layer, hidden)
        return layer_forward(layer, hidden, self.arch, self.position_embeddings)

    @property
    def the_family(self) -> Family:
        if self.family is None:
            self.family = family_of({"architectures": [_arch_class(self.arch)]})
        return self.family


@dataclass
class StreamResult:
    layers: int
    seconds: float
    layer_info: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Unit:
    """Linears reading one input (quantized as one stacked matrix), or a fused experts module."""

    names: tuple[str, ...]
    experts: bool = False

    @property
    def name(self) -> str:
        return self.names[0]


# ------------------------------------------------------------------------------------------------ helpers


class _Reached(Exception):
    """Raised by a capture hook: the rest of the layer's forward is not needed."""


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    module = layer.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise MergeqError(f"{name} is not a linear layer ({type(module).__name__})")
    return module


def _stacked(layer: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([_linear(layer, name).weight.detach().to(torch.float32) for name in names], dim=0)


def _split(layer: nn.Module, names: tuple[str, ...], stacked: QuantizedLinear) -> dict[str, QuantizedLinear]:
    result = {}
    start = 0
    for name in names:
        module = _linear(layer, name)
        rows = module.out_features
        piece = QuantizedLinear(
            codes=stacked.codes[start : start + rows],
            scales=stacked.scales[start : start + rows],
            zeros=stacked.zeros[start : start + rows],
            g_idx=stacked.g_idx.clone(),
            bias=None if module.bias is None else module.bias.detach().clone(),
        )
        module.weight.data.copy_(piece.dequantize(module.weight.dtype))
        result[name] = piece
        start += rows
    return result


def _rtn(module: nn.Linear, weight: torch.Tensor, scheme: QuantScheme) -> QuantizedLinear:
    return rtn_quantize(weight, scheme, bias=None if module.bias is None else module.bias.detach().clone())


def _check_units(layer: nn.Module, units: list[Unit], scheme: QuantScheme, prefix: str) -> None:
    if scheme.group_size == -1:
        return
    for unit in units:
        if unit.experts:
            module = layer.get_submodule(unit.name)
            sizes = {"gate_up_proj": module.gate_up_proj.shape[-1], "down_proj": module.down_proj.shape[-1]}
        else:
            sizes = {name: _linear(layer, name).in_features for name in unit.names}
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
    family = ctx.the_family
    experts = _experts_name(layer, family)
    user = ctx.options.exclude if ctx.options else ()
    found = {}
    for name, module in layer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if experts and name.startswith(experts + "."):
            continue
        if any(re.search(p, name) for p in family.excluded) or any(re.search(p, ctx.prefix + name) for p in user):
            continue
        found[name] = module
    return found


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


def find_units(layer: nn.Module, hidden: list[torch.Tensor], ctx: LayerContext) -> list[Unit]:
    """The layer's units in the order its forward uses them, from one forward of the first chunk (without
    calibration data: module order, one linear per unit). Linears the forward did not call come last."""
    linears = _quantizable(layer, ctx)
    experts = _experts_name(layer, ctx.the_family)
    _check_nothing_left(layer, linears, experts, ctx.prefix)
    if not hidden:
        return [Unit((name,)) for name in linears] + ([Unit((experts,), True)] if experts else [])
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_module, args, kwargs):
            if name not in seen:
                seen[name] = args[0] if args else next(iter(kwargs.values()))

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


def _inputs(layer: nn.Module, module: nn.Module, hidden: list[torch.Tensor], ctx: LayerContext, take) -> None:
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


def _first_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


# ---------------------------------------------------------------------------------------------- per layer


def quantize_layer(layer: nn.Module, hidden: list[torch.Tensor], ctx: LayerContext):
    """Quantize one decoder layer in place (its linears then hold the dequantized weights).

    `hidden`: the layer's inputs as chunks [samples, seq_len, hidden]. Returns (outputs as chunks,
    {name: QuantizedLinear} with names relative to the layer as the checkpoint spells them, info)."""
    method = ctx.options.method
    with torch.inference_mode():
        units = find_units(layer, hidden, ctx)
        _check_units(layer, units, ctx.options.scheme, ctx.prefix)
        if method == "gptq":
            return _gptq_layer(layer, hidden, ctx, units)
        if method == "awq":
            return _awq_layer(layer, hidden, ctx, units)
        return _rtn_layer(layer, hidden, ctx, units)


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
            _add_experts(quantized, ctx.the_family, per_expert)
            continue
        for name in unit.names:
            module = _linear(layer, name)
            q = _rtn(module, module.weight.detach(), scheme)
            if hidden:  # the quantized layer's outputs are needed only when activations flow
                module.weight.data.copy_(q.dequantize(module.weight.dtype))
            quantized[name] = q
    outputs = [ctx.call(layer, h, i) for i, h in enumerate(hidden)] if hidden else []
    return outputs, quantized, {}


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
            _inputs(layer, module, hidden, ctx, routed.add)
            per_expert, idle = moe.gptq(module, routed, ctx.options.scheme, solve)
            _add_experts(quantized, ctx.the_family, per_expert)
            _idle_note(ctx, idle, info)
            continue
        first = _linear(layer, unit.name)
        inputs: list[torch.Tensor] = []
        _inputs(layer, first, hidden, ctx, lambda args, kwargs, _into=inputs: _into.append(_first_arg(args, kwargs)))
        if not inputs:
            idle_linears.extend(unit.names)
            for name in unit.names:
                module = _linear(layer, name)
                q = _rtn(module, module.weight.detach(), ctx.options.scheme)
                module.weight.data.copy_(q.dequantize(module.weight.dtype))
                quantized[name] = q
            continue
        quantized |= _split(layer, unit.names, solve(_stacked(layer, unit.names), inputs))
        inputs.clear()
    if idle_linears:
        info["idle_linears"] = idle_linears
        log.warning(
            "decoder layer %d: %s received no calibration input: rounded to nearest",
            ctx.layer_index,
            ", ".join(idle_linears),
        )
    outputs = [ctx.call(layer, h, i) for i, h in enumerate(hidden)]
    return outputs, quantized, info


def _awq_layer(layer, hidden: list[torch.Tensor], ctx: LayerContext, units: list[Unit]):
    opts = ctx.options
    family = ctx.the_family
    require_awq(family)
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
                _stats.add(_first_arg(args, kwargs))
                _routed.add(args, kwargs)
        else:
            module = _linear(layer, unit.name)
            stats[unit.name] = awq_alg.InputStats(module.in_features, AWQ_SKETCH_ROWS, device, seed=index)

            def hook(_module, args, kwargs, _stats=stats[unit.name]):
                _stats.add(_first_arg(args, kwargs))

        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        outputs = [ctx.call(layer, h, i) for i, h in enumerate(hidden)]
    finally:
        for handle in hooks:
            handle.remove()

    info: dict = {"alpha": {}, "not_folded": {}}
    sketches: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for unit in units:
        unit_stats = stats[unit.name]
        weight = moe.stacked_gate_up(layer.get_submodule(unit.name)) if unit.experts else _stacked(layer, unit.names)
        fold = family.awq_fold(unit.name)
        s = torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)
        why = None
        if unit_stats.count == 0:
            why = "no calibration input"
        elif fold is None:
            why = f"no fold for {unit.name} in the {family.name} map"
        else:
            result = awq_alg.search_scales(weight, unit_stats, opts.scheme, grid=AWQ_GRID)
            why = _fold(layer, fold, result.scales)
            if why is None:
                s = result.scales
                info["alpha"][unit.name] = result.alpha
                if unit.experts:
                    layer.get_submodule(unit.name).gate_up_proj.data.mul_(s[None, None, :])
                else:
                    for name in unit.names:
                        _linear(layer, name).weight.data.mul_(s[None, :])
        if why is not None:
            info["alpha"][unit.name] = None
            info["not_folded"][unit.name] = why
        scales[unit.name] = s
        sketches[unit.name] = unit_stats.sketch / s
    if any(a is not None for a in info["alpha"].values()):
        _verify_folds(layer, hidden[0], outputs[0], ctx)
    quantized: dict[str, QuantizedLinear] = {}
    for index, unit in enumerate(units):
        if unit.experts:
            module = layer.get_submodule(unit.name)
            per_expert, idle, alphas = moe.awq_down(
                module,
                routed[unit.name],
                opts.scheme,
                AWQ_GRID,
                AWQ_SKETCH_ROWS,
                seed=1000 * (index + 1),
                shared=scales[unit.name],
            )
            _add_experts(quantized, family, per_expert)
            info["expert_down_alpha"] = alphas
            _idle_note(ctx, idle, info)
            continue
        for name in unit.names:
            module = _linear(layer, name)
            weight = module.weight.detach().to(torch.float32)
            if family.clips(name) and stats[unit.name].count:
                bound = awq_alg.search_clip(weight, sketches[unit.name], opts.scheme)
                weight = awq_alg.apply_clip(weight, bound, opts.scheme)
            q = _rtn(module, weight, opts.scheme)
            module.weight.data.copy_(q.dequantize(module.weight.dtype))
            quantized[name] = q
    return outputs, quantized, info


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
            f"{ctx.the_family.name} fold map in exporters/int4/families.py is wrong for this model",
            hint="use GPTQ, which needs no fold map",
        )


# ------------------------------------------------------------------------------------------- whole model


def quantize_streaming(
    model_dir: Path,
    tokens: torch.Tensor | None,
    options: EngineOptions,
    sink: Sink,
    output_dtype: torch.dtype = torch.float16,
    checkpoints: LayerCheckpoints | None = None,
) -> StreamResult:
    """Quantize every decoder layer of `model_dir` and send every output tensor to `sink`.

    `tokens`: calibration samples [N, L] (None for RTN, which needs none). `checkpoints`: where each finished
    layer is saved; layers already saved there for the same inputs are replayed, not recomputed."""
    started = time.perf_counter()
    config = read_model_config(model_dir)
    family = family_of(config)
    if options.method == "awq":
        require_awq(family)
    device = resolve_device(options.given.device)
    source = TensorSource(model_dir)
    skeleton = Skeleton(model_dir, source, family, device)
    needs_data = options.method != "rtn"
    if needs_data and tokens is None:
        raise MergeqError(f"{options.method} needs calibration samples")

    hidden: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in range(skeleton.count)]
    if needs_data:
        per_chunk = max(1, CHUNK_TOKENS // tokens.shape[1])
        hidden, calls = skeleton.capture(tokens, per_chunk)

    prefixes = tuple(skeleton.layer_prefix(i) for i in range(skeleton.count))
    for name in source.names():
        if not name.startswith(prefixes):
            if name.startswith(skeleton.prefix):
                raise MergeqError(f"tensor {name} belongs to no decoder layer in 0..{skeleton.count - 1}")
            sink.tensor(name, _to_output(source.get(name), name, output_dtype))

    layers = skeleton.count
    result = StreamResult(layers=layers, seconds=0.0)
    skip = checkpoints.start() if checkpoints is not None else 0
    if skip and needs_data and skip < layers:
        hidden = [h.to(device) for h in checkpoints.hidden(skip - 1)]
    for index in track(range(layers), f"{options.method} layers"):
        prefix = skeleton.layer_prefix(index)
        if index < skip:  # done by an earlier, killed run with the same inputs: the same bytes, replayed
            _send(sink, checkpoints.load(index), prefix, result)
            continue
        layer = skeleton.load_layer(index)
        ctx = LayerContext(
            options=options, family=family, calls=calls[index] if needs_data else None, layer_index=index, prefix=prefix
        )
        source.close()  # unmap what this layer read, so resident memory stays one layer deep
        outputs, quantized, info = quantize_layer(layer, hidden, ctx)
        done = LayerOutput(quantized={skeleton.disk_name(n): _to_cpu(q) for n, q in quantized.items()}, info=info)
        owned = {f"{name}.{p}" for name in quantized for p in ("weight", "bias")}
        if family.experts:
            owned |= {f"{family.experts.module}.gate_up_proj", f"{family.experts.module}.down_proj"}
        for name, tensor in layer.state_dict().items():
            if name not in owned:
                disk = skeleton.disk_name(name)
                done.tensors[disk] = _to_output(tensor, prefix + disk, output_dtype)
        _send(sink, done, prefix, result)
        if checkpoints is not None:
            checkpoints.save(index, done, outputs)
        hidden = outputs
        calls[index] = []
        skeleton.unload_layer(index)
        del layer, outputs, quantized, done
        release_freed_memory()  # glibc keeps freed heap pages: RSS grew 70 MB per layer without this
    source.close()
    if checkpoints is not None:
        checkpoints.finish()
    result.warnings = _warnings(result.layer_info, family, options.method)
    result.seconds = time.perf_counter() - started
    return result


def _send(sink: Sink, done: LayerOutput, prefix: str, result: StreamResult) -> None:
    for name, q in done.quantized.items():
        sink.linear(prefix + name, q)
    for name, tensor in done.tensors.items():
        sink.tensor(prefix + name, tensor)
    result.layer_info.append(done.info)


def _warnings(layer_info: list[dict], family: Family, method: str) -> list[str]:
    warnings = [
        f"decoder layer {index}: experts {info['idle_experts']} received no calibration tokens and were "
        "rounded to nearest (pass more or more varied calibration text)"
        for index, info in enumerate(layer_info)
        if info.get("idle_experts")
    ]
    notes = sorted({why for info in layer_info for why in info.get("not_folded", {}).values()})
    warnings += [f"AWQ: {why}" for why in notes]
    if method == "awq":
        warnings += [f"AWQ: {note}" for note in family.awq_notes]
    return warnings


def _to_cpu(q: QuantizedLinear) -> QuantizedLinear:
    return QuantizedLinear(
        codes=q.codes.cpu(),
        scales=q.scales.cpu(),
        zeros=q.zeros.cpu(),
        g_idx=q.g_idx.cpu(),
        bias=None if q.bias is None else q.bias.cpu(),
    )


def _to_output(tensor: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    converted = tensor.to(dtype)
    if not torch.isfinite(converted).all() and torch.isfinite(tensor).all():
        raise MergeqError(
            f"tensor {name} overflows {dtype} (largest magnitude {float(tensor.abs().max()):g})",
            hint="vLLM's int4 kernels run in float16; this checkpoint's values do not fit",
        )
    return converted


# ------------------------------------------- hand-built Llama-like layers (tests drive quantize_layer this way)


def _arch_class(arch: Architecture | None) -> str:
    if arch is None:
        return "unknown"
    return f"{arch.decoder_class[: -len('DecoderLayer')]}ForCausalLM"
