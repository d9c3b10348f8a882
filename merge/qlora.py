"""bitsandbytes 4-bit (NF4 / FP4, with or without double quantization) bases, dequantized on the CPU.

A 4-bit checkpoint saved by transformers stores, for every quantized weight `W`:
  W                                   uint8, two 4-bit codes per byte (high nibble first)
  W.absmax                            one scale per block (fp32; uint8 codes when double-quantized)
  W.quant_map                         the 16 code values (NF4 or FP4 table)
  W.nested_absmax, W.nested_quant_map (double quant only) fp32 scales of blocks of absmax, and their 256 codes
  W.quant_state.bitsandbytes__nf4     uint8 bytes of a JSON object: quant_type, blocksize, dtype, shape,
                                      and for double quant nested_blocksize, nested_dtype, nested_offset
Value i of W is quant_map[code_i] * absmax[i // blocksize], computed in fp32 and rounded to `dtype`, which is
what bitsandbytes' own dequantization (and so the QLoRA training forward pass) computes. The state is
validated first, and a corrupt one is reported by tensor name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch

from merge.checkpoint import Checkpoint
from mergeq.errors import MergeqError

STATE_RE = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__(?P<type>nf4|fp4)$")
AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
EIGHT_BIT_SUFFIXES = (".SCB", ".weight_format")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class QuantSettings:
    """How a base is (re)quantized: the QLoRA training settings."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self):
        if self.quant_type not in ("nf4", "fp4"):
            raise MergeqError(f"quantization type {self.quant_type!r} is not nf4 or fp4")
        if self.blocksize not in VALID_BLOCKSIZES:
            raise MergeqError(f"quantization blocksize {self.blocksize} is not one of {VALID_BLOCKSIZES}")


@dataclass
class QuantState:
    weight: str
    quant_type: str
    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    absmax: torch.Tensor
    quant_map: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    nested_blocksize: int | None = None
    nested_offset: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def quantized_weights(names: list[str]) -> dict[str, str]:
    """{weight name: quant state key} for every 4-bit weight; refuses 8-bit and stray quant tensors."""
    found: dict[str, str] = {}
    for name in names:
        match = STATE_RE.match(name)
        if match:
            found[match["weight"]] = name
        elif name.endswith(EIGHT_BIT_SUFFIXES):
            raise MergeqError(f"base tensor {name}: not supported: bitsandbytes 8-bit (LLM.int8) base",
                              hint="merge into the original fp16/bf16 base instead")
    for name in names:
        for suffix in AUX_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] not in found and ".quant_state." not in name:
                owner = name[: -len(suffix)]
                if f"{owner}.absmax" in names or suffix == ".absmax":
                    raise MergeqError(
                        f"corrupt bitsandbytes quant state: {name} exists but {owner}.quant_state.bitsandbytes__nf4 "
                        "(or __fp4) does not", hint="re-save the 4-bit checkpoint with transformers")
    return found


def _state_error(weight: str, what: str) -> MergeqError:
    return MergeqError(f"corrupt bitsandbytes quant state for {weight}: {what}",
                       hint="re-save the 4-bit checkpoint with transformers (model.save_pretrained)")


def read_state(ckpt: Checkpoint, weight: str, state_key: str) -> QuantState:
    """Read and validate one weight's quant state (small tensors only; the packed codes stay on disk)."""
    raw = ckpt.get(state_key)
    try:
        meta = json.loads(bytes(raw.to(torch.uint8).numpy().tobytes()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _state_error(weight, f"{state_key} is not JSON ({err})") from err
    quant_type = meta.get("quant_type")
    if quant_type != STATE_RE.match(state_key)["type"]:
        raise _state_error(weight, f"quant_type {quant_type!r} does not match the key {state_key}")
    blocksize = meta.get("blocksize")
    if blocksize not in VALID_BLOCKSIZES:
        raise _state_error(weight, f"blocksize {blocksize!r} is not one of {VALID_BLOCKSIZES}")
    dtype = DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise _state_error(weight, f"dtype {meta.get('dtype')!r} is not float32, float16 or bfloat16")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise _state_error(weight, f"shape {shape!r} is invalid")
    for part in ("absmax", "quant_map"):
        if f"{weight}.{part}" not in ckpt:
            raise _state_error(weight, f"missing tensor {weight}.{part}")
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    _, packed_shape = ckpt.info(weight)
    packed_dtype, _ = ckpt.info(weight)
    packed_bytes = math.prod(packed_shape) * torch.empty((), dtype=packed_dtype).element_size()
    if packed_bytes != -(-n // 2):
        raise _state_error(weight, f"{packed_bytes} packed bytes cannot hold shape {shape} "
                                   f"({-(-n // 2)} bytes needed)")
    absmax_dtype, absmax_shape = ckpt.info(f"{weight}.absmax")
    if math.prod(absmax_shape) != blocks:
        raise _state_error(weight, f"absmax has {math.prod(absmax_shape)} entries but shape {shape} with blocksize "
                                   f"{blocksize} needs {blocks} (wrong blocksize?)")
    quant_map = ckpt.get(f"{weight}.quant_map", torch.float32).reshape(-1)
    if quant_map.numel() != 16:
        raise _state_error(weight, f"quant_map has {quant_map.numel()} entries, not 16")
    state = QuantState(weight, quant_type, blocksize, dtype, tuple(shape),
                       absmax=ckpt.get(f"{weight}.absmax").reshape(-1), quant_map=quant_map)
    nested = "nested_blocksize" in meta or f"{weight}.nested_absmax" in ckpt
    if nested:
        for part in ("nested_absmax", "nested_quant_map"):
            if f"{weight}.{part}" not in ckpt:
                raise _state_error(weight, f"double quantization but missing tensor {weight}.{part}")
        for key in ("nested_blocksize", "nested_offset"):
            if key not in meta:
                raise _state_error(weight, f"double quantization but {state_key} lacks {key!r}")
        nb = meta["nested_blocksize"]
        if not isinstance(nb, int) or nb <= 0:
            raise _state_error(weight, f"nested_blocksize {nb!r} is invalid")
        if absmax_dtype != torch.uint8:
            raise _state_error(weight, f"double-quantized absmax should be uint8 codes, found {absmax_dtype}")
        state.nested_blocksize = nb
        state.nested_offset = float(meta["nested_offset"])
        state.nested_absmax = ckpt.get(f"{weight}.nested_absmax", torch.float32).reshape(-1)
        state.nested_quant_map = ckpt.get(f"{weight}.nested_quant_map", torch.float32).reshape(-1)
        if state.nested_quant_map.numel() != 256:
            raise _state_error(weight, f"nested_quant_map has {state.nested_quant_map.numel()} entries, not 256")
        if state.nested_absmax.numel() != -(-blocks // nb):
            raise _state_error(weight, f"nested_absmax has {state.nested_absmax.numel()} entries, "
                                       f"expected {-(-blocks // nb)}")
    elif absmax_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise _state_error(weight, f"absmax dtype {absmax_dtype} needs nested_absmax/nested_quant_map (double quant)")
    return state


def _blockwise(codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """table[codes[i]] * scales[i // blocksize] in fp32, for the first n codes."""
    values = table[codes[:n].to(torch.int64)]
    blocks = scales.numel()
    pad = blocks * blocksize - n
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    return (values.view(blocks, blocksize) * scales.view(-1, 1)).reshape(-1)[:n]


def absmax_of(state: QuantState) -> torch.Tensor:
    if state.nested_absmax is None:
        return state.absmax.to(torch.float32)
    blocks = state.absmax.numel()
    scales = _blockwise(state.absmax, state.nested_quant_map, state.nested_absmax, state.nested_blocksize, blocks)
    return scales + state.nested_offset


def dequantize_packed(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The weight in the dtype bitsandbytes would return (state.dtype)."""
    flat = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    codes = torch.empty(flat.numel() * 2, dtype=torch.uint8)
    codes[0::2] = flat >> 4
    codes[1::2] = flat & 0x0F
    values = _blockwise(codes, state.quant_map, absmax_of(state), state.blocksize, state.numel)
    return values.reshape(state.shape).to(state.dtype)


def dequantize(ckpt: Checkpoint, weight: str, state_key: str) -> torch.Tensor:
    state = read_state(ckpt, weight, state_key)
    return dequantize_packed(ckpt.get(weight), state)


def quantize_dequantize(weight: torch.Tensor, settings: QuantSettings) -> torch.Tensor:
    """What a QLoRA run sees of this weight: bitsandbytes 4-bit quantization (CPU), then our dequantization."""
    import bitsandbytes.functional as bnbf

    packed, qs = bnbf.quantize_4bit(weight.contiguous(), blocksize=settings.blocksize,
                                    compress_statistics=settings.double_quant, quant_type=settings.quant_type)
    state = QuantState(weight="(requantized)", quant_type=settings.quant_type, blocksize=settings.blocksize,
                       dtype=weight.dtype, shape=tuple(weight.shape), absmax=qs.absmax.reshape(-1),
                       quant_map=qs.code.to(torch.float32))
    if qs.nested:
        state.nested_absmax = qs.state2.absmax.to(torch.float32).reshape(-1)
        state.nested_quant_map = qs.state2.code.to(torch.float32)
        state.nested_blocksize = int(qs.state2.blocksize)
        state.nested_offset = float(qs.offset)
    return dequantize_packed(packed, state)


def quantized_shape(ckpt: Checkpoint, state_key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) of the dequantized weight, from the small JSON state tensor only."""
    raw = ckpt.get(state_key)
    try:
        meta = json.loads(bytes(raw.to(torch.uint8).numpy().tobytes()).decode("utf-8"))
        return DTYPES[meta["dtype"]], tuple(int(d) for d in meta["shape"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        weight = STATE_RE.match(state_key)["weight"]
        raise _state_error(weight, f"{state_key} does not hold a valid JSON state ({err})") from err


def check_quantization_config(config: dict, folder) -> str | None:
    """None for an ordinary base; 'bnb-4bit' for a bitsandbytes 4-bit one; refuses other quantized bases."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "unknown"))
    if method != "bitsandbytes":
        raise MergeqError(f"{folder}: not supported: {method}-quantized base",
                          hint="merge into the original fp16/bf16 base (or a bitsandbytes 4-bit one)")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise MergeqError(f"{folder}: not supported: bitsandbytes 8-bit (LLM.int8) base",
                          hint="merge into the original fp16/bf16 base instead")
    return "bnb-4bit"
