"""The torch reference of vLLM's CPU int4 GEMM (scripts/peers/wna16_reference.py) against its layout, built here.

The packed operands are built the way vLLM's C++ kernel reads them (csrc/cpu/cpu_wna16.cpp): for each block of 16
output channels and each input row one little-endian int64 whose nibble i is output 16b + i; zero points as int32
words packed along the outputs. The product is checked against float64 arithmetic on the same codes. The
reference is compared with vLLM's own op, where the CPU has it, by tests/test_vllm_serve.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "peers"))
import wna16_reference  # noqa: E402

K, N, GROUPS = 96, 64, 3


def kernel_weight(codes: np.ndarray) -> torch.Tensor:
    """[K, N] codes -> int32 [N/16, 2K]: per block b and row k one int64 with output 16b + i in nibble i."""
    k_size, n_size = codes.shape
    words = np.zeros((n_size // 16, k_size), dtype=np.uint64)
    for i in range(16):
        words |= codes[:, i::16].T.astype(np.uint64) << np.uint64(4 * i)
    return torch.from_numpy(words.view("<i4").reshape(n_size // 16, 2 * k_size).copy())


def kernel_zeros(zeros: np.ndarray) -> torch.Tensor:
    """[G, N] zero points -> int32 [G, N/8], output 8c + j in bits 4j of word c."""
    words = np.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=np.uint32)
    for j in range(8):
        words |= zeros[:, j::8].astype(np.uint32) << np.uint32(4 * j)
    return torch.from_numpy(words.view("<i4").copy())


@pytest.fixture
def operands():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(K, N))
    zeros = rng.integers(0, 16, size=(GROUPS, N))
    scales = torch.from_numpy(rng.uniform(0.001, 0.02, size=(GROUPS, N))).half()
    x = torch.from_numpy(rng.standard_normal((2, 3, K))).half()
    bias = torch.from_numpy(rng.standard_normal(N)).half()
    return codes, zeros, scales, x, bias


def expected(codes, zero, scales, x, bias):
    group = np.arange(K) // (K // GROUPS)
    weight = (torch.from_numpy(codes - zero).double() * scales.double()[group]).half().double()
    out = x.double() @ weight
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("with_bias", [False, True])
def test_awq_layout_with_zero_points(operands, with_bias):
    codes, zeros, scales, x, bias = operands
    bias = bias if with_bias else None
    out = wna16_reference.cpu_gemm_wna16(x, kernel_weight(codes), scales, kernel_zeros(zeros), bias, 8, "vec")
    group = np.arange(K) // (K // GROUPS)
    want = expected(codes, zeros[group], scales, x, bias)
    assert out.shape == (2, 3, N) and out.dtype == torch.float16
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)


def test_gptq_layout_subtracts_eight(operands):
    codes, _, scales, x, _ = operands
    out = wna16_reference.cpu_gemm_wna16(x, kernel_weight(codes), scales, None, None, 8, "vec")
    torch.testing.assert_close(out.double(), expected(codes, 8, scales, x, None), rtol=2e-3, atol=2e-3)


def test_only_four_bit_codes_are_accepted(operands):
    codes, _, scales, x, _ = operands
    with pytest.raises(ValueError, match="pack_factor 4"):
        wna16_reference.cpu_gemm_wna16(x, kernel_weight(codes), scales, None, None, 4, "vec")
