"""The quantizable tensors of one intermediate GGUF, the types each one's shape allows, and their exact bytes.

A GGUF's size is its header plus every tensor's data, each padded to the file's alignment. The header and
the tensors that stay as they are (norms, anything llama-quantize never quantizes) are fixed; a quantized
tensor of n_rows rows of n_cols values in a type with blocks of B values and S bytes per block takes
n_rows * n_cols / B * S bytes. A type applies only when B divides the row length (llama-quantize otherwise
falls back to another type: src/llama-quant.cpp, tensor_type_fallback), so on rows of 576 the 256-value
K-quants and IQ types do not apply and the 32-value types do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporters.gguf_inspect import UNQUANTIZED, GGUFSummary, pinned_constants

# Types the search considers by default, from most to fewest bits (llama-quantize names = gguf-py names).
# Each costs a quantization round, so types that an equal-size type beats with an imatrix are left out
# (on the demo model Q4_0 has 1.5-2x IQ4_NL's error, Q3_K 1.1-1.5x IQ3_S's, at the same size), and so is Q4_1:
# 11% more bytes than IQ4_NL for 10-15% less error, where Q5_0's next 11% buy 40% (off every tensor's hull).
# Q5_1 (6 bits) is the only step between Q5_0 and Q8_0 for rows that 256-value blocks don't divide (576 on
# the demo model), at about a third of Q5_0's error there. IQ3_XXS, IQ2 and IQ1 are slow to make and only pay
# under budgets far below Q3_K_M's: pass them in `candidates` for those.
DEFAULT_CANDIDATES = (
    "Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "Q2_K",
)  # fmt: skip
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Slot:
    """One tensor the budget decides a type for."""

    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    candidates: tuple[str, ...]  # types its row length allows, from DEFAULT_CANDIDATES order

    @property
    def role(self) -> str:
        """The tensor's name without its layer and suffix: attn_v, ffn_down, token_embd, ..."""
        base = _LAYER.sub("", self.name)
        return base[: -len(".weight")] if base.endswith(".weight") else base

    @property
    def layer(self) -> int | None:
        match = _LAYER.match(self.name)
        return int(match.group(1)) if match else None

    @property
    def n_elements(self) -> int:
        total = 1
        for dim in self.shape:
            total *= dim
        return total


def quant_sizes() -> dict[str, tuple[int, int]]:
    """type name -> (values per block, bytes per block), from the pinned gguf-py."""
    constants = pinned_constants()
    return {t.name: size for t, size in constants.GGML_QUANT_SIZES.items()}


def tensor_bytes(shape: tuple[int, ...], qtype: str, sizes: dict[str, tuple[int, int]]) -> int:
    block, type_size = sizes[qtype]
    total = 1
    for dim in shape:
        total *= dim
    return total // block * type_size


def padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def alignment_of(summary: GGUFSummary) -> int:
    return int(summary.metadata.get("general.alignment", pinned_constants().GGUF_DEFAULT_ALIGNMENT))


def allowed(columns: int, types: tuple[str, ...], sizes: dict[str, tuple[int, int]]) -> tuple[str, ...]:
    return tuple(t for t in types if columns % sizes[t][0] == 0)


def candidate_slots(summary: GGUFSummary, types: tuple[str, ...] = DEFAULT_CANDIDATES) -> list[Slot]:
    """Every float matrix of the intermediate that some candidate type fits (llama-quantize may still keep
    some of them as they are: the search drops those after its first quantization round)."""
    sizes = quant_sizes()
    slots = []
    for info in summary.tensors:
        if info.type not in UNQUANTIZED or not info.is_matrix:
            continue
        fits = allowed(info.columns, types, sizes)
        if fits:
            slots.append(Slot(info.name, tuple(info.shape), fits))
    return slots


@dataclass(frozen=True)
class SizeModel:
    """The exact file size of a mix: fixed bytes plus each slot's padded bytes in its type."""

    fixed_bytes: int  # header + the tensors no slot covers, padding included
    alignment: int
    sizes: dict[str, tuple[int, int]]

    def slot_bytes(self, slot: Slot, qtype: str) -> int:
        return padded(tensor_bytes(slot.shape, qtype, self.sizes), self.alignment)

    def file_bytes(self, slots: list[Slot], types: dict[str, str]) -> int:
        return self.fixed_bytes + sum(self.slot_bytes(s, types[s.name]) for s in slots)


def size_model(summary: GGUFSummary, slots: list[Slot]) -> SizeModel:
    """From the intermediate: its size less the padded data of the slots' tensors is what every mix shares."""
    align = alignment_of(summary)
    covered = {s.name for s in slots}
    slot_data = sum(padded(t.n_bytes, align) for t in summary.tensors if t.name in covered)
    return SizeModel(summary.size_bytes - slot_data, align, quant_sizes())


def type_file_lines(types: dict[str, str]) -> str:
    """llama-quantize's --tensor-type-file: one `regex=type` per line, each regex matching one tensor name
    exactly (the pinned llama-quantize searches them with std::regex in order; the first match wins)."""
    return "".join(f"^{re.escape(name)}$={qtype.lower()}\n" for name, qtype in sorted(types.items()))
