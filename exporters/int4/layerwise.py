"""The streaming engine: one decoder layer in memory at a time.

1. Embed the calibration tokens (the embedding matrix is read once, then freed).
2. For each decoder layer: read its tensors from the memory-mapped safetensors, build just that layer
   with transformers' own decoder-layer class, push the calibration activations through it while
   quantizing it, hand its tensors to the sink (which writes them), free it, and pass its outputs on.
3. The remaining tensors (final norm, lm_head) are copied through unquantized.

Peak memory is one layer plus the calibration activations, whatever the depth.

GPTQ is true-sequential inside a layer: q/k/v are quantized from their input's Hessian, then the
attention runs with the quantized q/k/v to give o_proj's input, and so on through gate/up and down; the
next layer receives the outputs of the quantized layer. AWQ runs the float layer once, collecting input
statistics for each group of linears, searches the scales, folds them, clips and rounds; the next layer
receives the float outputs (unchanged by the folding).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from exporters.int4 import awq as awq_alg
from exporters.int4.arch import Architecture, LinearGroup, architecture_of
from exporters.int4.checkpoint import TensorSource, read_config
from exporters.int4.gptq import HessianAccumulator, gptq_quantize
from exporters.int4.options import Int4Options
from exporters.int4.quant import QuantizedLinear, QuantScheme, rtn_quantize
from exporters.int4.resume import LayerCheckpoints, LayerOutput
from mergeq.core.errors import MergeqError
from mergeq.core.memory import release_freed_memory
from mergeq.core.progress import track

log = logging.getLogger(__name__)

METHODS = ("gptq", "awq", "rtn")


# the engine's own settings, not options
GPTQ_BLOCK = 128  # GPTQ lazy-batch block
AWQ_GRID = 20  # AWQ alpha grid points in [0, 1)
AWQ_SKETCH_ROWS = 128  # rows of the CountSketch AWQ measures output error against
CHUNK_TOKENS = 4096  # calibration tokens pushed through a layer at once


@dataclass(frozen=True)
class EngineOptions:
    """What the engine runs: the int4 options as given and the exact scheme planned from them
    (exporters.int4.export.plan)."""

    given: Int4Options
    scheme: QuantScheme

    def __post_init__(self):
        if self.method not in METHODS:
            raise MergeqError(f"unknown int4 method {self.method!r}", hint=f"choose one of {', '.join(METHODS)}")

    @property
    def method(self) -> str:
        return self.given.method


class Sink(Protocol):
    def linear(self, name: str, quantized: QuantizedLinear) -> None: ...

    def tensor(self, name: str, tensor: torch.Tensor) -> None: ...


@dataclass
class LayerContext:
    arch: Architecture
    options: EngineOptions
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    seq_len: int
    layer_index: int = 0


@dataclass
class StreamResult:
    layers: int
    seconds: float
    layer_info: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ helpers


def resolve_device(name: str) -> torch.device:
    if name != "auto" and name != "cpu" and not name.startswith("cuda"):
        raise MergeqError(f"--device {name!r} is not supported", hint="use cpu, cuda (or cuda:N) or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MergeqError("--device cuda: no CUDA device is available to torch", hint="use --device cpu or auto")
    return torch.device(name)


def hf_config_of(model_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    config._attn_implementation = "sdpa"
    return config


def _mask_for(attention: nn.Module, seq_len: int, device) -> torch.Tensor | None:
    """None (causal) unless the layer has a sliding window shorter than the samples."""
    window = getattr(attention, "sliding_window", None)
    if not window or window >= seq_len:
        return None
    i = torch.arange(seq_len, device=device)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return allowed[None, None]


class _Capture(nn.Module):
    """Stands in for a linear: records its input and returns zeros of the linear's output shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.captured: torch.Tensor | None = None

    def forward(self, x):
        self.captured = x
        return x.new_zeros(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def _captured(layer: nn.Module, name: str):
    parent_name, _, child = name.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    original = getattr(parent, child)
    capture = _Capture(original.out_features)
    setattr(parent, child, capture)
    try:
        yield capture
    finally:
        setattr(parent, child, original)


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    module = layer.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise MergeqError(f"{name} is not a linear layer ({type(module).__name__})")
    return module


def _stacked(layer: nn.Module, group: LinearGroup) -> torch.Tensor:
    return torch.cat([_linear(layer, name).weight.detach().to(torch.float32) for name in group.linears], dim=0)


def _split(layer: nn.Module, group: LinearGroup, stacked: QuantizedLinear) -> dict[str, QuantizedLinear]:
    result = {}
    start = 0
    for name in group.linears:
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


def _attention(layer, ctx: LayerContext, x: torch.Tensor, mask) -> torch.Tensor:
    attention = layer.get_submodule(ctx.arch.attention)
    out = attention(hidden_states=x, position_embeddings=ctx.position_embeddings, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out


def _check_group(layer: nn.Module, group: LinearGroup, scheme: QuantScheme) -> None:
    for name in group.linears:
        in_features = _linear(layer, name).in_features
        if scheme.group_size != -1 and in_features % scheme.group_size:
            raise MergeqError(f"{name}: in_features {in_features} is not divisible by --group-size {scheme.group_size}")


# ---------------------------------------------------------------------------------------------- per layer


def quantize_layer(layer: nn.Module, hidden: list[torch.Tensor], ctx: LayerContext):
    """Quantize one decoder layer in place (its linears then hold the dequantized weights).

    `hidden`: the layer's inputs as chunks [samples, seq_len, hidden]. Returns (outputs as chunks,
    {linear name: QuantizedLinear}, info)."""
    method = ctx.options.method
    for group in ctx.arch.groups:
        _check_group(layer, group, ctx.options.scheme)
    with torch.inference_mode():
        if method == "gptq":
            return _gptq_layer(layer, hidden, ctx)
        if method == "awq":
            return _awq_layer(layer, hidden, ctx)
        quantized = {}
        for group in ctx.arch.groups:
            for name in group.linears:
                module = _linear(layer, name)
                q = rtn_quantize(module.weight.detach(), ctx.options.scheme,
                                 bias=None if module.bias is None else module.bias.detach().clone())
                if hidden:  # the quantized layer's outputs are needed only when activations flow
                    module.weight.data.copy_(q.dequantize(module.weight.dtype))
                quantized[name] = q
        outputs = [_layer_forward(layer, h, ctx) for h in hidden] if hidden else []
        return outputs, quantized, {}


def _layer_forward(layer, h, ctx: LayerContext):
    mask = _mask_for(layer.get_submodule(ctx.arch.attention), h.shape[1], h.device)
    out = layer(h, attention_mask=mask, position_embeddings=ctx.position_embeddings)
    return out[0] if isinstance(out, tuple) else out


def _gptq_group(layer, group: LinearGroup, inputs: list[torch.Tensor], ctx: LayerContext) -> dict:
    opts = ctx.options
    acc = HessianAccumulator(inputs[0].shape[-1], inputs[0].device)
    for x in inputs:
        acc.add(x)
    try:
        given = opts.given
        stacked = gptq_quantize(_stacked(layer, group), acc.value(), opts.scheme, damp_percent=given.damp_percent,
                                act_order="dynamic" if given.desc_act else given.act_order, block_size=GPTQ_BLOCK)
    except RuntimeError as exc:
        raise MergeqError(f"GPTQ failed on {', '.join(group.linears)} of decoder layer {ctx.layer_index}: {exc}",
                          hint="raise --damp-percent (e.g. 0.1), or check the calibration text") from exc
    return _split(layer, group, stacked)


def _gptq_layer(layer, hidden: list[torch.Tensor], ctx: LayerContext):
    arch = ctx.arch
    groups = {g.name: g for g in arch.groups}
    norm1 = layer.get_submodule(arch.input_norm)
    norm2 = layer.get_submodule(arch.post_attention_norm)
    mlp = layer.get_submodule(arch.mlp)
    mask = _mask_for(layer.get_submodule(arch.attention), ctx.seq_len, hidden[0].device)
    o_name = groups["attn_out"].linears[0]
    down_name = groups["mlp_out"].linears[0]
    quantized: dict[str, QuantizedLinear] = {}

    x = [norm1(h) for h in hidden]
    quantized |= _gptq_group(layer, groups["attn_in"], x, ctx)
    with _captured(layer, o_name) as capture:
        o_in = []
        for chunk in x:
            _attention(layer, ctx, chunk, mask)
            o_in.append(capture.captured)
    del x
    quantized |= _gptq_group(layer, groups["attn_out"], o_in, ctx)
    o_proj = _linear(layer, o_name)
    residual = [h + o_proj(a) for h, a in zip(hidden, o_in)]
    del o_in
    x = [norm2(h) for h in residual]
    quantized |= _gptq_group(layer, groups["mlp_in"], x, ctx)
    with _captured(layer, down_name) as capture:
        mid = []
        for chunk in x:
            mlp(chunk)
            mid.append(capture.captured)
    del x
    quantized |= _gptq_group(layer, groups["mlp_out"], mid, ctx)
    down = _linear(layer, down_name)
    outputs = [h + down(m) for h, m in zip(residual, mid)]
    return outputs, quantized, {}


def _awq_layer(layer, hidden: list[torch.Tensor], ctx: LayerContext):
    opts = ctx.options
    arch = ctx.arch
    device = hidden[0].device
    stats: dict[str, awq_alg.InputStats] = {}
    hooks = []
    for index, group in enumerate(arch.groups):
        first = _linear(layer, group.linears[0])
        stats[group.name] = awq_alg.InputStats(first.in_features, AWQ_SKETCH_ROWS, device, seed=index)

        def hook(_module, args, _stats=stats[group.name]):
            _stats.add(args[0])

        hooks.append(first.register_forward_pre_hook(hook))
    try:
        outputs = [_layer_forward(layer, h, ctx) for h in hidden]
    finally:
        for handle in hooks:
            handle.remove()

    info: dict = {"alpha": {}}
    sketches: dict[str, torch.Tensor] = {}
    for group in arch.groups:
        weight = _stacked(layer, group)
        result = awq_alg.search_scales(weight, stats[group.name], opts.scheme, grid=AWQ_GRID)
        s = result.scales
        if not _fold(layer, group, s):
            s = torch.ones_like(s)
            info["alpha"][group.name] = None
        else:
            info["alpha"][group.name] = result.alpha
            for name in group.linears:
                _linear(layer, name).weight.data.mul_(s[None, :])
        sketches[group.name] = stats[group.name].sketch / s
    quantized: dict[str, QuantizedLinear] = {}
    for group in arch.groups:
        for name, clip in zip(group.linears, group.clip):
            module = _linear(layer, name)
            weight = module.weight.detach().to(torch.float32)
            if clip:
                bound = awq_alg.search_clip(weight, sketches[group.name], opts.scheme)
                weight = awq_alg.apply_clip(weight, bound, opts.scheme)
            q = rtn_quantize(weight, opts.scheme, bias=None if module.bias is None else module.bias.detach().clone())
            module.weight.data.copy_(q.dequantize(module.weight.dtype))
            quantized[name] = q
    return outputs, quantized, info


def _fold(layer, group: LinearGroup, s: torch.Tensor) -> bool:
    """Divide the producer of the group's input by s; False when the architecture does not allow it."""
    if group.fold_into is None:
        return False
    producer = layer.get_submodule(group.fold_into)
    if group.fold_kind == "norm":
        producer.weight.data.div_(s)
        return True
    if producer.weight.shape[0] != s.shape[0]:
        return False  # e.g. v_proj -> o_proj with grouped-query attention
    producer.weight.data.div_(s[:, None])
    if getattr(producer, "bias", None) is not None:
        producer.bias.data.div_(s)
    return True


# ------------------------------------------------------------------------------------------- whole model


def _layer_count(config: dict) -> int:
    return int(config["num_hidden_layers"])


def load_layer(source: TensorSource, arch: Architecture, hf_config, index: int, device) -> nn.Module:
    decoder_cls, _ = arch.classes()
    prefix = arch.layer_prefix(index)
    with torch.device("meta"):
        layer = decoder_cls(hf_config, layer_idx=index)
    state = {
        name[len(prefix):]: source.get(name).to(device=device, dtype=torch.float32)
        for name in source.names()
        if name.startswith(prefix)
    }
    try:
        layer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise MergeqError(f"decoder layer {index} ({prefix}*) does not match {arch.decoder_class}: {exc}") from exc
    return layer.eval()


def rotary_embeddings(arch: Architecture, hf_config, seq_len: int, device):
    _, rotary_cls = arch.classes()
    rotary = rotary_cls(config=hf_config).to(device)
    position_ids = torch.arange(seq_len, device=device)[None, :]
    dummy = torch.zeros(1, seq_len, 1, dtype=torch.float32, device=device)
    with torch.inference_mode():
        return rotary(dummy, position_ids)


def quantize_streaming(model_dir: Path, tokens: torch.Tensor | None, options: EngineOptions, sink: Sink,
                       output_dtype: torch.dtype = torch.float16,
                       checkpoints: LayerCheckpoints | None = None) -> StreamResult:
    """Quantize every decoder layer of `model_dir` and send every output tensor to `sink`.

    `tokens`: calibration samples [N, L] (None for RTN, which needs none). `checkpoints`: where each finished
    layer is saved; layers already saved there for the same inputs are replayed, not recomputed."""
    started = time.perf_counter()
    config = read_config(model_dir)
    arch = architecture_of(config)
    hf_config = hf_config_of(model_dir)
    device = resolve_device(options.given.device)
    source = TensorSource(model_dir)
    needs_data = options.method != "rtn"
    if needs_data and tokens is None:
        raise MergeqError(f"{options.method} needs calibration samples")

    hidden: list[torch.Tensor] = []
    ctx = LayerContext(arch=arch, options=options, position_embeddings=None, seq_len=0)
    if needs_data:
        seq_len = tokens.shape[1]
        per_chunk = max(1, CHUNK_TOKENS // seq_len)
        embed = source.get(arch.embed)
        with torch.inference_mode():
            for start in range(0, tokens.shape[0], per_chunk):
                ids = tokens[start : start + per_chunk]
                hidden.append(embed[ids].to(device=device, dtype=torch.float32))
        del embed
        ctx = LayerContext(arch=arch, options=options, seq_len=seq_len,
                           position_embeddings=rotary_embeddings(arch, hf_config, seq_len, device))

    layer_names = {arch.layer_prefix(i) for i in range(_layer_count(config))}
    for name in source.names():
        if not any(name.startswith(p) for p in layer_names):
            if name.startswith(arch.layers_prefix):
                raise MergeqError(f"tensor {name} belongs to no decoder layer in 0..{len(layer_names) - 1}")
            sink.tensor(name, _to_output(source.get(name), name, output_dtype))

    layers = _layer_count(config)
    result = StreamResult(layers=layers, seconds=0.0)
    skip = checkpoints.start() if checkpoints is not None else 0
    if skip and needs_data and skip < layers:
        hidden = [h.to(device) for h in checkpoints.hidden(skip - 1)]
    for index in track(range(layers), f"{options.method} layers"):
        if index < skip:  # done by an earlier, killed run with the same inputs: the same bytes, replayed
            _send(sink, checkpoints.load(index), arch.layer_prefix(index), result)
            continue
        layer = load_layer(source, arch, hf_config, index, device)
        ctx.layer_index = index
        source.close()  # unmap what this layer read, so resident memory stays one layer deep
        outputs, quantized, info = quantize_layer(layer, hidden, ctx)
        prefix = arch.layer_prefix(index)
        done = LayerOutput(quantized={name: _to_cpu(q) for name, q in quantized.items()}, info=info)
        owned = {f"{name}.{p}" for name in quantized for p in ("weight", "bias")}
        for name, tensor in layer.state_dict().items():
            if name not in owned:
                done.tensors[name] = _to_output(tensor, prefix + name, output_dtype)
        _send(sink, done, prefix, result)
        if checkpoints is not None:
            checkpoints.save(index, done, outputs)
        hidden = outputs
        del layer, outputs, quantized, done
        release_freed_memory()  # glibc keeps freed heap pages: RSS grew 70 MB per layer without this
    source.close()
    if checkpoints is not None:
        checkpoints.finish()
    result.seconds = time.perf_counter() - started
    return result


def _send(sink: Sink, done: LayerOutput, prefix: str, result: StreamResult) -> None:
    for name, q in done.quantized.items():
        sink.linear(prefix + name, q)
    for name, tensor in done.tensors.items():
        sink.tensor(prefix + name, tensor)
    result.layer_info.append(done.info)


def _to_cpu(q: QuantizedLinear) -> QuantizedLinear:
    return QuantizedLinear(codes=q.codes.cpu(), scales=q.scales.cpu(), zeros=q.zeros.cpu(), g_idx=q.g_idx.cpu(),
                           bias=None if q.bias is None else q.bias.cpu())


def _to_output(tensor: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    converted = tensor.to(dtype)
    if not torch.isfinite(converted).all() and torch.isfinite(tensor).all():
        raise MergeqError(f"tensor {name} overflows {dtype} (largest magnitude {float(tensor.abs().max()):g})",
                          hint="vLLM's int4 kernels run in float16; this checkpoint's values do not fit")
    return converted
