"""Mixture-of-Experts layers: transformers 5 keeps a layer's experts as two stacked parameters
(gate_up_proj [E, 2I, H], down_proj [E, H, I]) in one experts module that receives the normed hidden states
and the router's choice (top_k_index, top_k_weights). Each expert is two linears for the checkpoint: its
gate/up rows (quantized as one matrix, written as the family's gate and up tensors) and its down matrix.

Calibration sees an expert only through the tokens the router sends it: GPTQ builds each expert's Hessians
from those tokens (its down input from its own quantized gate/up); AWQ scales the shared input once over all
tokens (the norm feeds every expert and the router, whose columns absorb the scale) and each expert's down
input from its own tokens. An expert no calibration token reaches is rounded to nearest, and reported.
The router is never quantized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from exporters.int4 import awq as awq_alg
from exporters.int4.gptq import accumulate, gptq_quantize
from exporters.int4.quant import QuantizedLinear, QuantScheme, rtn_quantize
from mergeq.core.errors import MergeqError

log = logging.getLogger(__name__)


@dataclass
class Routed:
    """The experts module's inputs for each chunk: hidden [T, H] and the router's top-k indices [T, k]."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    top_k: list[torch.Tensor] = field(default_factory=list)

    def add(self, args, kwargs) -> None:
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index") if k in kwargs]
        self.hidden.append(values[0].reshape(-1, values[0].shape[-1]))
        self.top_k.append(values[1].reshape(values[0].reshape(-1, values[0].shape[-1]).shape[0], -1))

    def tokens_of(self, expert: int) -> list[torch.Tensor]:
        picked = []
        for hidden, top_k in zip(self.hidden, self.top_k):
            rows = (top_k == expert).any(dim=-1)
            if bool(rows.any()):
                picked.append(hidden[rows])
        return picked


def check_module(module: nn.Module, name: str) -> None:
    for attribute in ("gate_up_proj", "down_proj", "act_fn", "num_experts"):
        if not hasattr(module, attribute):
            raise MergeqError(
                f"{name} ({type(module).__name__}) has no {attribute}: not a fused experts module "
                "the int4 engine knows (gate_up_proj [E, 2I, H], down_proj [E, H, I])"
            )
    for attribute in ("gate_up_proj_bias", "down_proj_bias"):
        if getattr(module, attribute, None) is not None:
            raise MergeqError(
                f"{name} ({type(module).__name__}) has expert biases, which the int4 engine does not quantize",
                hint="leave this model unquantized or use another tool",
            )


def _gate_up(module, e: int) -> torch.Tensor:
    return module.gate_up_proj.data[e]


def _down_input(module, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
    return module.act_fn(gate) * up


def split_gate_up(q: QuantizedLinear) -> tuple[QuantizedLinear, QuantizedLinear]:
    half = q.codes.shape[0] // 2

    def rows(a, b):
        return QuantizedLinear(codes=q.codes[a:b], scales=q.scales[a:b], zeros=q.zeros[a:b], g_idx=q.g_idx.clone())

    return rows(0, half), rows(half, 2 * half)


def _store(module, e: int, gate_up: QuantizedLinear, down: QuantizedLinear) -> None:
    module.gate_up_proj.data[e].copy_(gate_up.dequantize(module.gate_up_proj.dtype))
    module.down_proj.data[e].copy_(down.dequantize(module.down_proj.dtype))


def rtn(module, scheme: QuantScheme) -> dict[int, tuple[QuantizedLinear, QuantizedLinear]]:
    out = {}
    for e in range(module.num_experts):
        out[e] = (rtn_quantize(_gate_up(module, e), scheme), rtn_quantize(module.down_proj.data[e], scheme))
    return out


def gptq(module, routed: Routed, scheme: QuantScheme, solve) -> tuple[dict, list[int]]:
    """Each expert from its own tokens; `solve(weight, feed)` is the engine's GPTQ for one matrix (gptq_solver).
    Returns ({expert: (gate_up, down)}, experts without tokens)."""
    out, idle = {}, []
    for e in range(module.num_experts):
        tokens = routed.tokens_of(e)
        if not tokens:
            idle.append(e)
            gate_up = rtn_quantize(_gate_up(module, e), scheme)
            down = rtn_quantize(module.down_proj.data[e], scheme)
        else:
            gate_up = solve(_gate_up(module, e), lambda add, _tokens=tokens: [add(x) for x in _tokens])
            module.gate_up_proj.data[e].copy_(gate_up.dequantize(module.gate_up_proj.dtype))
            down = solve(
                module.down_proj.data[e],
                lambda add, _e=e, _tokens=tokens: [add(_down_input(module, _e, x)) for x in _tokens],
            )
        _store(module, e, gate_up, down)
        out[e] = (gate_up, down)
    return out, idle


def gptq_solver(scheme: QuantScheme, given, block_size: int, where: str):
    """GPTQ of one matrix, with the user's options `given` (damp_percent, desc_act, act_order).

    solve(weight, feed): `feed(add)` calls add(x) for each of the matrix's inputs x, as they are produced, and
    may be called more than once (to build the Hessian afresh with more dampening). Returns None when no input
    came."""

    def solve(weight: torch.Tensor, feed) -> QuantizedLinear | None:
        first = [accumulate(weight.shape[1], weight.device, feed)]
        if first[0].count == 0:
            return None

        def hessian() -> torch.Tensor:
            return (first.pop() if first else accumulate(weight.shape[1], weight.device, feed)).value()

        try:
            return gptq_quantize(
                weight,
                hessian,
                scheme,
                damp_percent=given.damp_percent,
                act_order="dynamic" if given.desc_act else given.act_order,
                block_size=block_size,
            )
        except RuntimeError as exc:
            raise MergeqError(
                f"GPTQ failed on {where}: {exc}", hint="raise --damp-percent (e.g. 0.1), or check the calibration text"
            ) from exc

    return solve


def awq_down(
    module, routed: Routed, scheme: QuantScheme, grid: int, sketch_rows: int, seed: int, shared: torch.Tensor
) -> tuple[dict, list[int], dict]:
    """AWQ for every expert's down matrix (its input scale folds into the expert's up rows), then rounding
    of every expert's gate/up and down. Call after the shared input's scale `shared` is folded (the captured
    inputs predate it: they are divided by it here)."""
    out, idle, alphas = {}, [], {}
    inter = module.down_proj.shape[-1]
    for e in range(module.num_experts):
        tokens = [x / shared for x in routed.tokens_of(e)]
        gate_up_w = _gate_up(module, e).to(torch.float32)
        if not tokens:
            idle.append(e)
            out[e] = (rtn_quantize(gate_up_w, scheme), rtn_quantize(module.down_proj.data[e], scheme))
            _store(module, e, *out[e])
            continue
        stats_in = awq_alg.InputStats(gate_up_w.shape[1], sketch_rows, gate_up_w.device, seed=seed + e)
        stats = awq_alg.InputStats(inter, sketch_rows, gate_up_w.device, seed=seed + e)
        for x in tokens:
            stats_in.add(x)
            stats.add(_down_input(module, e, x))
        down_w = module.down_proj.data[e].to(torch.float32)
        result = awq_alg.search_scales(down_w, stats, scheme, grid=grid)
        s = result.scales
        alphas[e] = result.alpha
        gate_up_w[inter:] /= s[:, None]  # the up rows feed down's input channel by channel
        down_w = down_w * s[None, :]
        gate_up_w = awq_alg.apply_clip(gate_up_w, awq_alg.search_clip(gate_up_w, stats_in.sketch, scheme), scheme)
        down_w = awq_alg.apply_clip(down_w, awq_alg.search_clip(down_w, stats.sketch / s, scheme), scheme)
        out[e] = (rtn_quantize(gate_up_w, scheme), rtn_quantize(down_w, scheme))
        _store(module, e, *out[e])
    return out, idle, alphas


def stacked_gate_up(module) -> torch.Tensor:
    """All experts' gate/up rows as one [E * 2I, H] matrix: they share one input (and one AWQ scale)."""
    return module.gate_up_proj.data.reshape(-1, module.gate_up_proj.shape[-1]).to(torch.float32)
