"""What one adapter does to one base tensor: one small class per operation, each knowing the shape it expects
and how PEFT's merge_and_unload applies it (in fp32).

    LoraOp     W + s B A (an embedding or a fan_in_fan_out / Conv1D weight is stored transposed: W + s A^T B^T)
    DoraOp     LoRA, then every output row rescaled to the trained magnitude
    BiasOp     b + s b_lora (lora_bias)
    ReplaceOp  the adapter's own copy (modules_to_save; may resize an embedding)
    TokensOp   some rows replaced (trainable tokens)
    ExpertLoraOp  W + s B_e A_e, rows [start, stop): one expert's part of a LoRA on a fused MoE parameter
                  (target_parameters, merge/experts.py)

Planning (merge/plan.py) picks the class for each adapter part from LORA_OPS and the adapter's part kinds;
nothing downstream looks at which class it holds, only at `expected_shape`, `apply` and the flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from merge.adapters import Adapter, LoraModule
from merge.experts import ExpertSlice, expert_factors
from mergeq.core.errors import MergeqError


@dataclass
class ShapeCheck:
    """What an operation may need to know about its tensor while the plan checks shapes."""

    name: str
    resizable: bool  # an input or output embedding: modules_to_save may change its row count
    saved_base: bool  # the adapter saved the (resized) base layer for this tensor
    changes: int  # how many adapter operations change this tensor
    mismatches: list[str] = field(default_factory=list)


class Operation:
    exclusive = False  # rewrites the whole weight: an adapter may do at most one such change to a tensor
    blockwise = False  # W + sum of low-rank products: mergeable a block of rows at a time from the memory map

    def expected_shape(
        self, adapter: Adapter, base: tuple[int, ...], current: tuple[int, ...], check: ShapeCheck
    ) -> tuple[int, ...]:
        """Record any mismatch with the base in `check.mismatches`; return the tensor's shape after this op."""
        raise NotImplementedError

    def apply(self, adapter: Adapter, current: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The tensor after this op, from `current` (the result so far) and the unmerged `base` (both fp32);
        neither is modified unless `current` is already a fresh tensor of this merge."""
        raise NotImplementedError


@dataclass
class LoraOp(Operation):
    lora: LoraModule
    transposed: bool = False  # the weight is stored (in, out): an embedding, fan_in_fan_out, GPT-2's Conv1D

    exclusive = True
    blockwise = True

    def expected_shape(self, adapter, base, current, check):
        a, b = adapter.shape(self.lora.a_key), adapter.shape(self.lora.b_key)
        want = (a[1], b[0]) if self.transposed else (b[0], a[1])
        if tuple(base) != want:
            check.mismatches.append(f"{self.lora.module}: base {list(base)}, adapter expects {list(want)}")
        return current

    def factors(self, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(left, right, alpha) with W + alpha * left @ right the merge at weight 1 (rows of left = rows of W)."""
        a = adapter.tensor(self.lora.a_key)
        b = adapter.tensor(self.lora.b_key)
        left, right = (a.T.contiguous(), b.T.contiguous()) if self.transposed else (b, a)
        return left, right, self.lora.scale

    def apply(self, adapter, current, base):
        a = adapter.tensor(self.lora.a_key)
        b = adapter.tensor(self.lora.b_key)
        # W + scale * B @ A in one fused pass (transposed: A^T B^T = (B A)^T)
        return (
            torch.addmm(current, a.T, b.T, alpha=self.lora.scale)
            if self.transposed
            else torch.addmm(current, b, a, alpha=self.lora.scale)
        )


@dataclass
class DoraOp(LoraOp):
    blockwise = False

    def expected_shape(self, adapter, base, current, check):
        super().expected_shape(adapter, base, current, check)
        magnitude = tuple(adapter.shape(self.lora.magnitude_key))
        want = (adapter.shape(self.lora.b_key)[0],)
        if magnitude != want:
            check.mismatches.append(f"{self.lora.module}: DoRA magnitude {list(magnitude)}, expected {list(want)}")
        return current

    def apply(self, adapter, current, base):
        a = adapter.tensor(self.lora.a_key)
        b = adapter.tensor(self.lora.b_key)
        delta = b @ a  # (out, in) for linear; (dim, vocab) for an embedding
        delta.mul_(self.lora.scale)
        del a, b
        # rescale each output row (column of the stored weight when transposed) to the trained magnitude; the
        # norm is taken on the unmerged base weight plus this adapter's delta, as PEFT does
        magnitude = adapter.tensor(self.lora.magnitude_key)
        base_c = base.T if self.transposed else base
        norm = torch.linalg.norm(base_c + delta, dim=1)
        factor = (magnitude / norm).view(-1, 1)
        current_c = current.T if self.transposed else current
        merged = factor * (current_c + delta)
        return merged.T.contiguous() if self.transposed else merged


# a LoRA module's operation, by whether it carries a DoRA magnitude
LORA_OPS: dict[bool, type[LoraOp]] = {False: LoraOp, True: DoraOp}


@dataclass
class BiasOp(Operation):
    key: str
    scale: float

    def expected_shape(self, adapter, base, current, check):
        shape = tuple(adapter.shape(self.key))
        if shape != tuple(base):
            check.mismatches.append(f"{check.name}: base bias {list(base)}, adapter bias {list(shape)}")
        return current

    def apply(self, adapter, current, base):
        return current + self.scale * adapter.tensor(self.key)


@dataclass
class ReplaceOp(Operation):
    key: str

    exclusive = True

    def expected_shape(self, adapter, base, current, check):
        shape = tuple(adapter.shape(self.key))
        if shape == tuple(base):
            return current
        if not (check.resizable and len(shape) == len(base) and shape[1:] == tuple(base[1:])):
            check.mismatches.append(f"{check.name}: base {list(base)}, adapter's modules_to_save {list(shape)}")
        elif not check.saved_base and (check.changes > 1 or adapter.weight != 1.0):
            raise MergeqError(
                f"adapter {adapter.path} resizes {check.name} to {shape[0]} rows; combining it with a weight "
                "or with other adapters needs the resized base layer saved in the adapter",
                hint="save the adapter with save_embedding_layers=True, or merge it alone with weight 1",
            )
        return shape

    def apply(self, adapter, current, base):
        return adapter.tensor(self.key)


@dataclass
class TokensOp(Operation):
    key: str
    indices: list[int]

    def expected_shape(self, adapter, base, current, check):
        shape = tuple(adapter.shape(self.key))
        rows = current[0]
        if len(base) != 2 or shape[1:] != tuple(base[1:]):
            check.mismatches.append(f"{check.name}: trainable token rows {list(shape)} vs base {list(base)}")
        elif max(self.indices, default=-1) >= rows or min(self.indices, default=0) < 0:
            check.mismatches.append(f"{check.name}: trainable token index {max(self.indices)} outside {rows} rows")
        return current

    def apply(self, adapter, current, base):
        current = current.clone() if current is base else current
        current[torch.tensor(self.indices, dtype=torch.int64)] = adapter.tensor(self.key)
        return current


@dataclass
class ExpertLoraOp(Operation):
    piece: ExpertSlice

    exclusive = True
    blockwise = True

    def expected_shape(self, adapter, base, current, check):
        lora, piece = self.piece.lora, self.piece
        want = (piece.stop - piece.start, lora.in_features)
        if tuple(base) != want:
            check.mismatches.append(
                f"{check.name}: base {list(base)}, expert {piece.expert} of {lora.name} in the "
                f"adapter expects {list(want)}"
            )
        return current

    def factors(self, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor, float]:
        lora = self.piece.lora
        left, right = expert_factors(lora, adapter.tensor(lora.a_key), adapter.tensor(lora.b_key), self.piece)
        return left, right, lora.scale

    def apply(self, adapter, current, base):
        left, right, scale = self.factors(adapter)
        return torch.addmm(current, left, right, alpha=scale)
