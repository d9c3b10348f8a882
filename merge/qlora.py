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

from mergeq.core.checkpoint import Checkpoint
from mergeq.core.errors import MergeqError

STATE_RE = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__(?P<type>nf4|fp4)$")
AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
EIGHT_BIT_SUFFIXES = (".SCB", ".weight_format")
# dtype names as config.json, bitsandbytes metadata and --dtype spell them
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
            raise MergeqError(
                f"base tensor {name}: not supported: bitsandbytes 8-bit (LLM.int8) base",
                hint="merge into the original fp16/bf16 base instead",
            )
    for name in names:
        for suffix in AUX_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] not in found and ".quant_state." not in name:
                owner = name[: -len(suffix)]
                if f"{owner}.absmax" in names or suffix == ".absmax":
                    raise MergeqError(
                        f"corrupt bitsandbytes quant state: {name} exists but {owner}.quant_state.bitsandbytes__nf4 "
                        "(or __fp4) does not",
                        hint="re-save the 4-bit checkpoint with transformers",
                    )
    return found


def _state_error(weight: str, what: str) -> MergeqError:
    return MergeqError(
        f"corrupt bitsandbytes quant state for {weight}: {what}",
        hint="re-save the 4-bit checkpoint with transformers (model.save_pretrained)",
    )


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
    dtype = TORCH_DTYPES.get(meta.get("dtype"))
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
        raise _state_error(weight, f"{packed_bytes} packed bytes cannot hold shape {shape} ({-(-n // 2)} bytes needed)")
    absmax_dtype, absmax_shape = ckpt.info(f"{weight}.absmax")
    if math.prod(absmax_shape) != blocks:
        raise _state_error(
            weight,
            f"absmax has {math.prod(absmax_shape)} entries but shape {shape} with blocksize "
            f"{blocksize} needs {blocks} (wrong blocksize?)",
        )
    quant_map = ckpt.get(f"{weight}.quant_map", torch.float32).reshape(-1)
    if quant_map.numel() != 16:
        raise _state_error(weight, f"quant_map has {quant_map.numel()} entries, not 16")
    state = QuantState(
        weight,
        quant_type,
        blocksize,
        dtype,
        tuple(shape),
        absmax=ckpt.get(f"{weight}.absmax").reshape(-1),
        quant_map=quant_map,
    )
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
            raise _state_error(
                weight, f"nested_absmax has {state.nested_absmax.numel()} entries, expected {-(-blocks // nb)}"
            )
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


# ------------------------------------------------------------------------------------- quantizing (our own)
# The 4-bit code tables and the 8-bit "dynamic" table of double quantization, as bitsandbytes defines them
# (QLoRA paper, arXiv 2305.14314, and Dettmers 2015, arXiv 1511.04561). Built in fp32 exactly as bitsandbytes
# builds them, so the codes and the dequantized values are bit for bit the same.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (e2m1 with bitsandbytes' own code order): code i holds FP4_RAW[i] / 12
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
NESTED_BLOCKSIZE = 256  # double quantization: blocks of 256 absmax values, 8-bit dynamic codes


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 fp32 values of the NF4 or FP4 code, indexed by code."""
    raw = torch.tensor(NF4_VALUES if quant_type == "nf4" else FP4_RAW, dtype=torch.float32)
    return raw / raw.abs().max()


def dynamic_table() -> torch.Tensor:
    """The signed 8-bit dynamic code (256 sorted fp32 values): for exponent i = 0..6, 2**i fractions between
    0.1 and 1 (midpoints of an fp32 linspace) times 10**(i-6) in fp32, both signs; then 0 and 1."""
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()  # products in fp32
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def _nearest_codes(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table value for each scaled value (ties go up), as int64."""
    order = torch.argsort(table)
    ordered = table[order]
    codes = torch.bucketize(scaled, (ordered[:-1] + ordered[1:]) / 2)
    return order[codes]


def _blocks_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, values divided by their block's absmax and clamped to [-1, 1]); a short last block
    is its own block. fp32 throughout."""
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def quantize_4bit(weight: torch.Tensor, settings: QuantSettings) -> tuple[torch.Tensor, QuantState]:
    """bitsandbytes' 4-bit blockwise quantization: (packed uint8 codes, high nibble first; its quant state)."""
    flat = weight.reshape(-1).to(torch.float32)
    absmax, scaled = _blocks_absmax(flat, settings.blocksize)
    table = code_table(settings.quant_type)
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # an odd count is padded with the code of 0.0
    codes = _nearest_codes(scaled, table).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    state = QuantState(
        weight="(requantized)",
        quant_type=settings.quant_type,
        blocksize=settings.blocksize,
        dtype=weight.dtype,
        shape=tuple(weight.shape),
        absmax=absmax,
        quant_map=table,
    )
    if settings.double_quant:
        offset = absmax.mean()
        nested_absmax, nested_scaled = _blocks_absmax(absmax - offset, NESTED_BLOCKSIZE)
        nested_table = dynamic_table()
        state.absmax = _nearest_codes(nested_scaled, nested_table).to(torch.uint8)
        state.nested_absmax = nested_absmax
        state.nested_quant_map = nested_table
        state.nested_blocksize = NESTED_BLOCKSIZE
        state.nested_offset = float(offset)
    return packed, state


def quantize_dequantize(weight: torch.Tensor, settings: QuantSettings) -> torch.Tensor:
    """What a QLoRA run saw of this weight: 4-bit quantization as bitsandbytes does it, then dequantization,
    in the weight's dtype (one tensor at a time; nothing else is held)."""
    packed, state = quantize_4bit(weight, settings)
    return dequantize_packed(packed, state)


def quantized_shape(ckpt: Checkpoint, state_key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) of the dequantized weight, from the small JSON state tensor only."""
    raw = ckpt.get(state_key)
    try:
        meta = json.loads(bytes(raw.to(torch.uint8).numpy().tobytes()).decode("utf-8"))
        return TORCH_DTYPES[meta["dtype"]], tuple(int(d) for d in meta["shape"])
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
        raise MergeqError(
            f"{folder}: not supported: {method}-quantized base",
            hint="merge into the original fp16/bf16 base (or a bitsandbytes 4-bit one)",
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise MergeqError(
            f"{folder}: not supported: bitsandbytes 8-bit (LLM.int8) base",
            hint="merge into the original fp16/bf16 base instead",
        )
    return "bnb-4bit"
