"""GPTQ (Frantar et al., 2022): quantize the columns of W one at a time and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction
loss ||W X - Q X||^2, whose Hessian is H = 2 X X^T over the calibration tokens.

Rows are independent given H, so linears that read the same input (q, k, v; gate, up) are solved as one
stacked matrix. Updates are applied lazily, one block of columns at a time (block = a whole number of
groups), using the upper Cholesky factor of H^-1.

Memory: one in_features^2 float32 matrix (0.8 GB for a 14336-wide down_proj) is the largest thing GPTQ holds.
The Hessian is permuted, dampened and factored in its own buffer (Cholesky, inverse, upper Cholesky of the
inverse, each written over the last); only when the dampened Hessian turns out not positive definite is it
built again from the inputs, with more dampening.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from exporters.int4.quant import QuantizedLinear, QuantScheme, group_params
from mergeq.core.device import torch_threads

log = logging.getLogger(__name__)

DAMP_ATTEMPTS = 6  # dampening x1, x10, ... x10^5
PERMUTE_ROWS = 256  # rows permuted at a time (the scratch is PERMUTE_ROWS x in_features)
TRANSPOSE_BLOCK = 1024


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


def accumulate(features: int, device, feed: Callable[[Callable[[torch.Tensor], None]], None]) -> HessianAccumulator:
    """A Hessian accumulator fed by `feed(add)`, which calls add(x) for each input as it is produced (no list of
    inputs is kept: the inputs of a 14336-wide down_proj are 57 KB per token)."""
    acc = HessianAccumulator(features, device)
    feed(acc.add)
    return acc


def _permute_columns_(m: torch.Tensor, perm: torch.Tensor) -> None:
    """m <- m[:, perm] in place, some rows at a time (a gather into a new matrix would hold two)."""
    for start in range(0, m.shape[0], PERMUTE_ROWS):
        m[start : start + PERMUTE_ROWS] = m[start : start + PERMUTE_ROWS, perm]


def _permute_rows_(m: torch.Tensor, perm: list[int]) -> None:
    """m <- m[perm] in place, one cycle of the permutation at a time with one row of scratch."""
    done = bytearray(len(perm))
    for start in range(len(perm)):
        if done[start]:
            continue
        saved = m[start].clone()
        i = start
        while True:
            done[i] = 1
            source = perm[i]
            if source == start:
                m[i].copy_(saved)
                break
            m[i].copy_(m[source])
            i = source


def _transpose_(m: torch.Tensor) -> None:
    """m <- m^T in place for a square m, one pair of blocks at a time."""
    n = m.shape[0]
    for i in range(0, n, TRANSPOSE_BLOCK):
        rows = slice(i, min(i + TRANSPOSE_BLOCK, n))
        m[rows, rows] = m[rows, rows].t().clone()
        for j in range(i + TRANSPOSE_BLOCK, n, TRANSPOSE_BLOCK):
            cols = slice(j, min(j + TRANSPOSE_BLOCK, n))
            upper = m[rows, cols].clone()
            m[rows, cols] = m[cols, rows].t()
            m[cols, rows] = upper.t()


def _prepared(hessian: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor) -> torch.Tensor:
    """The Hessian, permuted, with dead columns set to 1 on the diagonal, as a column-major view of its own buffer
    (the layout LAPACK factors in place: torch.linalg.cholesky then needs no copy)."""
    h = hessian if hessian.dtype == torch.float32 else hessian.to(torch.float32)
    if perm is not None:
        _permute_columns_(h, perm)
        _permute_rows_(h, perm.tolist())
    _transpose_(h)
    h = h.mT  # logically the permuted Hessian again, now column-major
    h[dead, dead] = 1.0
    return h


def _inverse_cholesky_upper_(h: torch.Tensor, damp: float, attempt: int) -> bool:
    """Overwrite the column-major `h` with the upper Cholesky factor of (H + damp * 10^attempt * I)^-1: Cholesky,
    inverse and upper Cholesky all in h's buffer. False when the dampened H is not positive definite (h is then
    garbage)."""
    h.diagonal().add_(damp * 10**attempt)
    info = torch.zeros((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(h, out=(h, info))
    if int(info) != 0:
        return False
    torch.cholesky_inverse(h, out=h)
    torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
    return int(info) == 0


def gptq_quantize(
    weight: torch.Tensor,
    hessian: Callable[[], torch.Tensor],
    scheme: QuantScheme,
    *,
    damp_percent: float = 0.01,
    act_order: str = "static",
    block_size: int = 128,
) -> QuantizedLinear:
    """Quantize weight [out, in] against the Hessian [in, in]; codes come back in the original column order
    with g_idx. `weight` is read, not changed.

    `hessian()` returns the Hessian (float32), which GPTQ takes over and overwrites; it is called again, for
    a fresh one, only when the dampened Hessian is not positive definite and the dampening is raised.

    act_order: "none" processes columns in order; "static" processes them by decreasing Hessian diagonal
    but keeps the contiguous groups, with each group's scale fixed from the original weights before any
    update (g_idx stays trivial, so every kernel takes it); "dynamic" (desc_act) also forms the groups in
    that order, which needs g_idx."""
    if act_order not in ("none", "static", "dynamic"):
        raise ValueError(f"act_order must be none, static or dynamic, not {act_order!r}")
    h = hessian()
    w = weight.to(torch.float32, copy=True)
    out_features, in_features = w.shape
    group = scheme.effective_group_size(in_features)
    n_groups = in_features // group
    maxq = scheme.maxq

    # columns no calibration token reached: their Hessian diagonal is 0; they count as 1 and quantize to 0
    diagonal = torch.diagonal(h).to(torch.float32, copy=True)
    dead = diagonal == 0
    diagonal = diagonal.masked_fill(dead, 1.0)
    w[:, dead] = 0.0

    static = None
    if act_order == "static" and group < in_features:
        static = group_params(w.reshape(out_features, n_groups, group), scheme)  # ([out, groups], [out, groups])
    perm = None
    if act_order != "none":
        perm = torch.argsort(diagonal, descending=True, stable=True)
        _permute_columns_(w, perm)
        dead = dead[perm]
    h = _prepared(h, perm, dead)
    damp = damp_percent * float(torch.diagonal(h).mean())
    for attempt in range(DAMP_ATTEMPTS):
        if attempt:  # the failed factorization left garbage in h: build the Hessian afresh
            del h
            h = _prepared(hessian(), perm, dead)
        if _inverse_cholesky_upper_(h, damp, attempt):
            if attempt:
                log.warning("GPTQ: Hessian needed %gx the dampening to be positive definite", 10**attempt)
            break
    else:
        raise RuntimeError("GPTQ: the Hessian is not positive definite even with 10^5 x dampening")
    u = h
    del h

    codes = torch.zeros(out_features, in_features, dtype=torch.uint8, device=w.device)  # the codes are 0..maxq
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
        # one thread: one column's vectors are too small to share (2 busy cores: 2.4 s per 128-column block of a
        # 14336-row matrix on 2 threads, 0.15 s on 1); elementwise, so the same bytes on any thread count
        with torch_threads(1):
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
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # the block's error onto the later columns: one matmul, all threads

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
