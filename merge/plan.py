"""Planning: before any tensor is read, decide what happens to every base tensor and the shape it comes out with.

From the base's tensor names and shapes and the adapters' parts (merge.adapters), each adapter part is matched
to one base tensor and becomes an operation (merge/ops.py): a LoRA/DoRA product on a weight, a trained bias,
a modules_to_save replacement, trainable token rows, one expert's part of a LoRA on a fused MoE parameter, or a
saved (resized) base layer that replaces the base's own. Every shape is checked (the first mismatches are listed
at once), and a tied output embedding that the checkpoint does not store (`virtual_head`) follows the input
embedding unless an adapter changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from merge.adapters import Adapter, Replacement
from merge.experts import disk_slices
from merge.ops import LORA_OPS, BiasOp, ExpertLoraOp, Operation, ReplaceOp, ShapeCheck, TokensOp
from mergeq.core.errors import MergeqError

MAX_LISTED = 8


@dataclass
class Plan:
    ops: dict[str, list[tuple[Adapter, Operation]]] = field(default_factory=dict)  # by output tensor, in order
    base_layers: dict[str, tuple[Adapter, Replacement]] = field(default_factory=dict)  # saved base layers
    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    virtual_head: bool = False  # a tied lm_head the checkpoint does not store


def plan_merge(source) -> Plan:
    """The plan for merging `source.adapters` into the base `source` (a merge.source.Source being opened)."""
    plan = Plan(virtual_head=bool(source.info.tied and source.out_w and source.out_w not in source.shapes))
    known = set(source.shapes) | ({source.out_w} if plan.virtual_head else set())
    unmatched: list[str] = []
    mismatches: list[str] = []
    for adapter in source.adapters:
        for rep in adapter.base_layers.values():
            if rep.tensor not in known:
                unmatched.append(f"{rep.tensor} (saved base layer, adapter {adapter.path})")
                continue
            plan.base_layers.setdefault(rep.tensor, (adapter, rep))
        for rep in adapter.replacements.values():
            if rep.tensor not in known:
                unmatched.append(f"{rep.tensor} (modules_to_save, adapter {adapter.path})")
                continue
            _add(plan, rep.tensor, adapter, ReplaceOp(rep.key))
        for lora in adapter.loras.values():
            target = f"{lora.module}.weight"
            if target not in known:
                unmatched.append(f"{lora.module} (adapter {adapter.path})")
                continue
            kind = source.info.kind(lora.module)
            fifo = kind == "conv1d" if kind in ("linear", "conv1d") else bool(adapter.config.get("fan_in_fan_out"))
            op_class = LORA_OPS[lora.magnitude_key is not None]
            _add(plan, target, adapter, op_class(lora, transposed=lora.kind == "embedding" or fifo))
            if lora.bias_key:
                bias = f"{lora.module}.bias"
                if bias not in known:
                    mismatches.append(
                        f"{lora.module}: the adapter trains a bias (lora_bias) but the base module has none"
                    )
                else:
                    _add(plan, bias, adapter, BiasOp(lora.bias_key, lora.scale))
        for expert_lora in adapter.expert_loras.values():
            for target, piece in disk_slices(
                expert_lora, source.config.get("model_type"), source.shapes, adapter.path
            ).items():
                _add(plan, target, adapter, ExpertLoraOp(piece))
        for tokens in adapter.tokens.values():
            target = f"{tokens.module}.weight"
            if target not in known:
                unmatched.append(f"{tokens.module} (trainable tokens, adapter {adapter.path})")
                continue
            op = TokensOp(tokens.key, tokens.indices)
            _add(plan, target, adapter, op)
            if source.info.tied and target == source.in_w and source.out_w in known:
                _add(plan, source.out_w, adapter, op)  # PEFT mirrors token rows onto a tied output embedding
    if unmatched:
        raise MergeqError(
            f"{len(unmatched)} adapter target module(s) match nothing in the base {source.folder}: "
            + "; ".join(unmatched[:MAX_LISTED])
            + (" ..." if len(unmatched) > MAX_LISTED else ""),
            hint="the adapter was trained on another model; pass the base it was trained on",
        )
    for adapter, rep in plan.base_layers.values():
        _check_base_layer(source, plan, adapter, rep, mismatches)
    for name in sorted(known):
        plan.out_shapes[name] = _out_shape(source, plan, name, mismatches)
    if mismatches:
        raise MergeqError(
            f"adapter {', '.join(str(a.path) for a in source.adapters)} does not fit the base {source.folder} "
            f"({len(mismatches)} shape mismatch(es)); first: " + "; ".join(mismatches[:MAX_LISTED]),
            hint="the adapter was trained on another base model; pass the base it was trained on",
        )
    _check_vocab(source, plan)
    return plan


def _add(plan: Plan, tensor: str, adapter: Adapter, op: Operation) -> None:
    ops = plan.ops.setdefault(tensor, [])
    if op.exclusive and any(a is adapter and o.exclusive for a, o in ops):
        raise MergeqError(f"adapter {adapter.path} changes {tensor} twice (LoRA and modules_to_save?)")
    ops.append((adapter, op))


def base_shape(source, plan: Plan, name: str) -> tuple[int, ...]:
    """The shape of a tensor before the adapters' operations (a saved base layer replaces the base's own)."""
    if name in plan.base_layers:
        adapter, rep = plan.base_layers[name]
        return tuple(adapter.shape(rep.key))
    if name == source.out_w and plan.virtual_head:
        return base_shape(source, plan, source.in_w)
    return source.shapes[name][1]


def _check_base_layer(source, plan: Plan, adapter: Adapter, rep: Replacement, mismatches: list[str]) -> None:
    shape = tuple(adapter.shape(rep.key))
    base = source.shapes[rep.tensor][1] if rep.tensor in source.shapes else base_shape(source, plan, source.in_w)
    if len(shape) != len(base) or shape[1:] != base[1:] or shape[0] < base[0]:
        mismatches.append(f"{rep.tensor}: adapter's saved base layer {list(shape)} vs base {list(base)}")
    for other in source.adapters:
        orep = other.base_layers.get(rep.tensor)
        if other is not adapter and orep is not None and tuple(other.shape(orep.key)) != shape:
            raise MergeqError(
                f"adapters {adapter.path} and {other.path} do not share one base: their saved "
                f"{rep.tensor} differ in shape",
                hint="merge adapters trained on one base only",
            )


def _out_shape(source, plan: Plan, name: str, mismatches: list[str]) -> tuple[int, ...]:
    base = base_shape(source, plan, name)
    ops = plan.ops.get(name, [])
    check = ShapeCheck(
        name,
        resizable=name in (source.in_w, source.out_w),
        saved_base=name in plan.base_layers,
        changes=len(ops),
        mismatches=mismatches,
    )
    out = base
    for adapter, op in ops:
        out = op.expected_shape(adapter, base, out, check)
    return tuple(out)


def _check_vocab(source, plan: Plan) -> None:
    in_w, out_w = source.in_w, source.out_w
    if not (in_w and out_w) or out_w not in plan.out_shapes or in_w not in plan.out_shapes:
        return
    emb, head = plan.out_shapes[in_w], plan.out_shapes[out_w]
    if emb[0] != head[0] and not plan.virtual_head:
        raise MergeqError(
            f"the adapter gives {in_w} {emb[0]} rows but {out_w} {head[0]} rows "
            "(resized vocabulary without the matching output layer)",
            hint="save the adapter with modules_to_save=['lm_head', 'embed_tokens'] or save_embedding_layers=True",
        )
    if plan.virtual_head and emb[0] != head[0]:
        # a tied head follows the resized embedding unless the adapter gives its own
        plan.out_shapes[out_w] = emb if out_w not in plan.ops else head
