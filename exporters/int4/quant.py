"""Group-wise integer quantization of a linear weight, and packing of the codes into int32 words.

Conventions used everywhere in exporters.int4:
- A weight W has shape [out_features, in_features]; input column i belongs to group g_idx[i].
- Codes are unsigned integers in [0, 2**bits - 1]; zero points are codes too (symmetric: 2**(bits-1)).
- W ~= (code - zero[:, g_idx]) * scale[:, g_idx], with scale rounded to float16 before the codes are
  computed, so that what a reader dequantizes from the stored float16 scales is exactly what the
  algorithm saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergeq.core.errors import MergeqError


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    group_size: int = 64  # -1: one group over the whole input dimension (per channel)
    sym: bool = True
    min_zero: int = 0  # GPTQ v1 checkpoints store zero-1 in 4 bits, so they cannot hold a zero point of 0

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise MergeqError(f"--bits {self.bits} is not supported", hint="use --bits 4 (or 8)")
        if self.group_size != -1 and (self.group_size < 8 or self.group_size % 8):
            raise MergeqError(
                f"--group-size {self.group_size} is not supported",
                hint="use a multiple of 8 such as 32, 64 or 128, or -1 for one group per output channel",
            )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    @property
    def label(self) -> str:
        group = "c" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{group}-{'sym' if self.sym else 'asym'}"


@dataclass
class QuantizedLinear:
    """One quantized linear: codes [out, in] uint8, scales [out, G] float16, zeros [out, G] int32 codes,
    g_idx [in] int32 (group of each input column), and the float bias if the layer has one."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inf = self.codes.shape
        groups = self.scales.shape[1]
        scale = self.scales.to(torch.float32)
        zero = self.zeros.to(torch.float32)
        codes = self.codes.to(torch.float32)
        contiguous = default_g_idx(inf, inf // groups, self.g_idx.device).long() if inf % groups == 0 else None
        if contiguous is not None and torch.equal(self.g_idx.long(), contiguous):
            grouped = codes.view(out, groups, inf // groups)
            return ((grouped - zero[..., None]) * scale[..., None]).view(out, inf).to(dtype)
        g = self.g_idx.long()
        return ((codes - zero[:, g]) * scale[:, g]).to(dtype)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32, device=device)
    return (torch.arange(in_features, device=device) // group_size).to(torch.int32)


def group_params(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32 holding float16-representable values) and zero (float32 code) per row of `w`,
    from the row's min/max over its last dimension; w has shape [..., n]."""
    zero_t = torch.zeros((), dtype=w.dtype, device=w.device)
    wmin = torch.minimum(w.amin(dim=-1), zero_t)
    wmax = torch.maximum(w.amax(dim=-1), zero_t)
    if scheme.sym:
        amax = torch.maximum(wmax, -wmin)
        scale = amax * (2.0 / scheme.maxq)
        scale = _fp16_scale(scale)
        zero = torch.full_like(scale, float(scheme.sym_zero))
    else:
        scale = _fp16_scale((wmax - wmin) / scheme.maxq)
        zero = torch.clamp(torch.round(-wmin / scale), scheme.min_zero, scheme.maxq)
    return scale, zero


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round to float16 and keep it away from 0 (an all-zero group gets scale 1, code = zero)."""
    scale = scale.to(torch.float16).to(torch.float32)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes (float tensor of integers) of `w` given broadcastable scale and zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return (quantize_codes(w, scale, zero, maxq) - zero) * scale


def rtn_fake_quantize(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of w [out, in] with contiguous groups."""
    out, inf = w.shape
    gs = scheme.effective_group_size(inf)
    wg = w.reshape(out, inf // gs, gs)
    scale, zero = group_params(wg, scheme)
    return fake_quantize(wg, scale[..., None], zero[..., None], scheme.maxq).reshape(out, inf)


def rtn_quantize(w: torch.Tensor, scheme: QuantScheme, bias: torch.Tensor | None = None) -> QuantizedLinear:
    """Round-to-nearest with contiguous groups: the baseline every calibrated method must beat."""
    w = w.to(torch.float32)
    out, inf = w.shape
    gs = scheme.effective_group_size(inf)
    wg = w.reshape(out, inf // gs, gs)
    scale, zero = group_params(wg, scheme)
    codes = quantize_codes(wg, scale[..., None], zero[..., None], scheme.maxq).reshape(out, inf)
    return QuantizedLinear(
        codes=codes.to(torch.uint8),
        scales=scale.to(torch.float16),
        zeros=zero.to(torch.int32),
        g_idx=default_g_idx(inf, scheme.group_size, device=w.device),
        bias=bias,
    )


# ---------------------------------------------------------------------------------------------------------
# Packing: `bits`-bit codes into int32 words, lowest bits first. `order` permutes the codes within a word
# (AWQ's interleave): nibble j of a word holds element order[j] of its 8-element run.


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> int32 with the same bit pattern (the low half of each int64)."""
    low_first = torch.tensor([1], dtype=torch.int16).view(torch.uint8)[0].item() == 1
    halves = words.contiguous().view(torch.int32).view(*words.shape, 2)
    return halves[..., 0 if low_first else 1].contiguous()


def pack_last(codes: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """Pack along the last dimension: [..., n] integer codes -> [..., n * bits / 32] int32."""
    per_word = 32 // bits
    n = codes.shape[-1]
    if n % per_word:
        raise MergeqError(f"cannot pack {n} values into 32-bit words of {per_word} codes")
    grouped = codes.to(torch.int64).reshape(*codes.shape[:-1], n // per_word, per_word)
    if order is not None:
        grouped = grouped[..., order]
    shifts = torch.arange(per_word, dtype=torch.int64, device=codes.device) * bits
    return _to_int32((grouped << shifts).sum(dim=-1))


def unpack_last(words: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """Inverse of pack_last: [..., m] int32 -> [..., m * 32 / bits] int64 codes."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * bits
    unpacked = (words.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    if order is not None:
        inverse = [0] * per_word
        for slot, element in enumerate(order):
            inverse[element] = slot
        unpacked = unpacked[..., inverse]
    return unpacked.reshape(*words.shape[:-1], words.shape[-1] * per_word)


def pack_first(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dimension 0: [n, m] -> [n * bits / 32, m] int32."""
    return pack_last(codes.t(), bits).t().contiguous()


def unpack_first(words: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_last(words.t(), bits).t().contiguous()
