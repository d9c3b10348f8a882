"""GPTQ (Frantar et al., 2022): quantize the columns of W one at a time and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction
loss ||W X - Q X||^2, whose Hessian is H = 2 X X^T over the calibration tokens.

Rows are independent given H, so linears that read the same input (q, k, v; gate, up) are solved as one
stacked matrix. Updates are applied lazily, one block of columns at a time (block = a whole number of
groups), using the upper Cholesky factor of H^-1.
"""

from __future__ import annotations

import logging

import torch

from exporters.int4.quant import QuantizedLinear, QuantScheme, group_params

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running H = 2/n * sum(x x^T) over the rows x of the inputs it is fed."""

    def __init__(self, features: int, device):
        self.h = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.h.addmm_(x.t(), x)
        self.count += x.shape[0]

    def value(self) -> torch.Tensor:
        """The Hessian 2/n * X^T X, scaled in place and handed over: the accumulator holds no copy afterwards
        (one in_features^2 matrix is 0.8 GB for a 14336-wide down_proj)."""
        h, self.h = self.h, None
        return h.mul_(2.0 / max(self.count, 1))


def _inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1, damping more if H is not positive definite.

    `h` is the caller's own copy and is overwritten: the dampening goes onto its diagonal in place, and each
    factor is freed as soon as the next exists, so at most three in_features^2 matrices live at once (H, L,
    L^-T L^-1), not seven."""
    diagonal = h.diagonal().clone()
    for attempt in range(6):
        h.diagonal().copy_(diagonal + damp * 10**attempt)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            if attempt:
                log.warning("GPTQ: Hessian needed %gx the dampening to be positive definite", 10**attempt)
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0:
                return upper
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with 10^5 x dampening")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    *,
    damp_percent: float = 0.01,
    act_order: str = "static",
    block_size: int = 128,
) -> QuantizedLinear:
    """Quantize weight [out, in] (float32) against the Hessian [in, in]; codes come back in the original column
    order with g_idx.

    act_order: "none" processes columns in order; "static" processes them by decreasing Hessian diagonal
    but keeps the contiguous groups, with each group's scale fixed from the original weights before any
    update (g_idx stays trivial, so every kernel takes it); "dynamic" (desc_act) also forms the groups in
    that order, which needs g_idx."""
    if act_order not in ("none", "static", "dynamic"):
        raise ValueError(f"act_order must be none, static or dynamic, not {act_order!r}")
    w = weight.to(torch.float32).clone()
    out_features, in_features = w.shape
    group = scheme.effective_group_size(in_features)
    n_groups = in_features // group
    maxq = scheme.maxq

    # columns no calibration token reached: their Hessian diagonal is 0; they count as 1 and quantize to 0
    diagonal = torch.diagonal(hessian).to(torch.float32)
    dead = diagonal == 0
    diagonal = diagonal.masked_fill(dead, 1.0)
    w[:, dead] = 0.0

    static = None
    if act_order == "static" and group < in_features:
        static = group_params(w.reshape(out_features, n_groups, group), scheme)  # ([out, groups], [out, groups])
    perm = None
    if act_order != "none":
        perm = torch.argsort(diagonal, descending=True, stable=True)
        w = w[:, perm]
        h = hessian.to(torch.float32)[perm[:, None], perm[None, :]]  # one permuted copy: the only one made
        dead = dead[perm]
    else:
        h = hessian.to(torch.float32).clone()
    h[dead, dead] = 1.0

    damp = damp_percent * float(torch.diagonal(h).mean())
    u = _inverse_cholesky_upper(h, damp)
    del h

    codes = torch.zeros(out_features, in_features, dtype=torch.float32, device=w.device)
    scales = torch.zeros(out_features, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.zeros(out_features, n_groups, dtype=torch.float32, device=w.device)

    block = max(1, block_size // group) * group if group < in_features else in_features
    if static is not None:
        scales, zeros = static
        column_group = (perm // group).tolist()  # group of each processed (permuted) column
        block = block_size
    scale = zero = None
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = column_group[col]
                scale, zero = scales[:, g], zeros[:, g]
            elif col % group == 0:
                # group boundaries coincide with block boundaries, so the group lies inside w1
                scale, zero = group_params(w1[:, i : i + group], scheme)
                scales[:, col // group] = scale
                zeros[:, col // group] = zero
            column = w1[:, i]
            q = torch.clamp(torch.round(column / scale) + zero, 0, maxq)
            codes[:, col] = q
            error = (column - (q - zero) * scale) / u1[i, i]
            w1[:, i + 1 :].addr_(error, u1[i, i + 1 :], alpha=-1.0)
            err1[:, i] = error
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    g_idx = torch.arange(in_features, device=w.device) // group
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        if static is None:
            g_idx = g_idx[inverse]
    return QuantizedLinear(
        codes=codes.to(torch.uint8),
        scales=scales.to(torch.float16),
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
    )
