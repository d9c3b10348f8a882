"""AWQ (Lin et al., 2023): protect the input channels that carry large activations by scaling them up
before quantization (W * s) and folding 1/s into whatever produces the input (a norm or a linear), then
clip each group's range where that lowers the output error.

- Scale search: s = mean|x|^alpha for alpha on a grid in [0, 1) (alpha = 0 is plain round-to-nearest),
  normalized so that sqrt(max * min) = 1; the alpha with the lowest ||(Q(W s)/s - W) X||^2 over the
  group's linears wins.
- Clip search: per output row and group, the largest |w| allowed is shrunk by up to `max_shrink`; the
  shrink with the lowest error through the group's own input columns wins. q and k are not clipped.

The output errors are measured against a CountSketch of the calibration inputs: every token is added,
with a random sign, into one of `sketch_rows` rows, so sketch^T sketch estimates X^T X without bias while
each loss costs `sketch_rows` instead of all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exporters.int4.quant import QuantScheme, group_params, quantize_codes


def sketch_add(
    sketch: torch.Tensor, bucket: torch.Tensor, sign: torch.Tensor, x: torch.Tensor, by_matmul: bool
) -> None:
    """sketch[bucket[t]] += sign[t] * x[t] for every token t. On the CPU index_add_ adds in token order; on CUDA it
    adds with atomics in no fixed order, so the sums (and AWQ's choices on near ties) would change from run to run:
    there (`by_matmul`) the same sums are one matmul with a signed one-hot matrix, whose order is fixed."""
    if not by_matmul:
        sketch.index_add_(0, bucket, x * sign[:, None])
        return
    onehot = torch.zeros(sketch.shape[0], x.shape[0], dtype=x.dtype, device=x.device)
    onehot[bucket, torch.arange(x.shape[0], device=x.device)] = sign
    sketch.addmm_(onehot, x)


class InputStats:
    """Mean |x| per channel and a CountSketch of the rows of X, accumulated chunk by chunk."""

    def __init__(self, features: int, rows: int, device, seed: int = 0):
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.sketch = torch.zeros(rows, features, dtype=torch.float32, device=device)
        self.count = 0
        self.rows = rows
        self._gen = torch.Generator(device="cpu").manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        n = x.shape[0]
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        bucket = torch.randint(0, self.rows, (n,), generator=self._gen).to(x.device)
        sign = (torch.randint(0, 2, (n,), generator=self._gen) * 2 - 1).to(x.device, torch.float32)
        sketch_add(self.sketch, bucket, sign, x, by_matmul=x.device.type != "cpu")
        self.count += n

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).to(torch.float32)


@dataclass
class ScaleResult:
    scales: torch.Tensor  # [in] multiply the group's weight columns, divide the producer's output
    alpha: float
    loss: float
    rtn_loss: float


def _fake_quant_error(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Q(w) - w for w [out, in] with contiguous groups."""
    out, inf = w.shape
    gs = scheme.effective_group_size(inf)
    wg = w.reshape(out, inf // gs, gs)
    scale, zero = group_params(wg, scheme)
    scale = scale[..., None]
    zero = zero[..., None]
    q = quantize_codes(wg, scale, zero, scheme.maxq)
    return ((q - zero) * scale - wg).reshape(out, inf)


def search_scales(weight: torch.Tensor, stats: InputStats, scheme: QuantScheme, grid: int = 20) -> ScaleResult:
    """Best per-input-channel scale for the stacked weight [out, in] of linears sharing one input.

    Candidates: s = mean|x|^alpha for `grid` values of alpha in [0, 1), searched coarse to fine (every second
    point, then the neighbours of the best), which finds the best grid point whenever the loss is unimodal in
    alpha."""
    x_mean = stats.mean_abs.clamp(min=1e-8)
    losses: dict[int, tuple[float, torch.Tensor]] = {}

    def evaluate(step: int) -> float:
        if step not in losses:
            s = x_mean.pow(step / grid).clamp(min=1e-4)
            s = s / torch.sqrt(s.max() * s.min())
            # ||(Q(W s)/s - W) X^T|| = ||(Q(W s) - W s) (X / s)^T||
            error = _fake_quant_error(weight * s, scheme)
            losses[step] = (float((error @ (stats.sketch / s).t()).square().sum()), s)
        return losses[step][0]

    coarse = min(range(0, grid, 2), key=evaluate)
    best = min((step for step in (coarse - 1, coarse, coarse + 1) if 0 <= step < grid), key=evaluate)
    return ScaleResult(scales=losses[best][1], alpha=best / grid, loss=losses[best][0], rtn_loss=evaluate(0))


def search_clip(
    weight: torch.Tensor, sketch: torch.Tensor, scheme: QuantScheme, *, grid: int = 20, max_shrink: float = 0.5
) -> torch.Tensor:
    """Per (row, group) clip bound for weight [out, in], given the sketch [rows, in] of its (scaled) input."""
    out, inf = weight.shape
    gs = scheme.effective_group_size(inf)
    groups = inf // gs
    wg = weight.reshape(out, groups, gs)
    xg = sketch.reshape(sketch.shape[0], groups, gs)
    hgg = torch.einsum("rgk,rgl->gkl", xg, xg)  # [groups, gs, gs], the diagonal blocks of X^T X
    original = wg.abs().amax(dim=-1)  # [out, groups]
    best_bound = original.clone()
    best_loss = torch.full_like(original, float("inf"))
    for step in range(int(max_shrink * grid)):
        bound = original * (1 - step / grid)
        clipped = torch.maximum(torch.minimum(wg, bound[..., None]), -bound[..., None])
        scale, zero = group_params(clipped, scheme)
        scale, zero = scale[..., None], zero[..., None]
        q = (quantize_codes(clipped, scale, zero, scheme.maxq) - zero) * scale
        delta = (q - wg).transpose(0, 1)  # [groups, out, gs]
        loss = (torch.bmm(delta, hgg) * delta).sum(-1).t()  # [out, groups]
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_bound = torch.where(better, bound, best_bound)
    return best_bound


def apply_clip(weight: torch.Tensor, bound: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    out, inf = weight.shape
    gs = scheme.effective_group_size(inf)
    wg = weight.reshape(out, inf // gs, gs)
    return torch.maximum(torch.minimum(wg, bound[..., None]), -bound[..., None]).reshape(out, inf)
