"""The streaming merge: adapters + base -> one fp16/bf16 checkpoint, one tensor at a time.

Plan first, then stream. Planning reads only headers, configs and adapter shapes: it matches every adapter
tensor to a base tensor, checks all shapes (listing the first mismatches), and fixes the output layout.
Streaming then reads one base tensor from the memory map (dequantizing 4-bit ones), applies every adapter
in fp32, checks the result (finite, fits the output dtype), casts once and appends it to the current output
shard. Memory holds a few copies of one tensor at a time, whatever the number of layers.

Several adapters are combined by task arithmetic: out = W + sum_i weight_i * (merge_i(W) - W), where
merge_i(W) is exactly what PEFT's merge_and_unload would give for adapter i alone (for plain LoRA that is
W + sum_i weight_i * scale_i * B_i A_i).

Everything is written into a temporary sibling of --out and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge import manifest as manifest_mod
from merge.adapters import Adapter, LoraModule, Replacement, describe_adapter, load_adapter, read_config
from merge.model_info import ModelInfo, describe
from merge.options import AdapterRef, MergeConfig
from merge.qlora import (
    QuantSettings,
    check_quantization_config,
    dequantize,
    quantize_dequantize,
    quantized_shape,
    quantized_weights,
    read_state,
)
from merge.qlora_detect import Decision, adapter_evidence, decide, user_base_evidence
from mergeq.core.atomic import atomic_dir, write_json
from mergeq.core.checkpoint import Checkpoint
from mergeq.core.errors import MergeqError
from mergeq.core.modelfiles import copy_aux_files, read_model_config
from mergeq.core.progress import track
from mergeq.core.shards import OutTensor, ShardWriter

log = logging.getLogger(__name__)

OUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FP16_MAX = 65504.0
BLOCK_FLOATS = 1 << 18  # fp32 values per block of rows in the row-blocked LoRA merge (1 MiB: stays in cache)
MAX_LISTED = 8


@dataclass
class MergeResult:
    out: Path
    manifest: dict
    warnings: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    validation: dict | None = None


# ----------------------------------------------------------------------------------------------- output checks

def _inside(child: Path, parent: Path) -> bool:
    return child == parent or child.is_relative_to(parent)


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    out_r = Path(out).resolve()
    for source in inputs:
        src = Path(source).resolve()
        if _inside(out_r, src):
            raise MergeqError(f"output directory {out} is inside the input {source}",
                              hint="choose an --out directory outside every input folder")
        if _inside(src, out_r):
            raise MergeqError(f"input {source} is inside the output directory {out}",
                              hint="choose an --out directory that holds no input")
    if out_r.exists():
        if not out_r.is_dir():
            raise MergeqError(f"output {out} exists and is not a directory", hint="choose another --out")
        if any(out_r.iterdir()) and not overwrite:
            raise MergeqError(f"output directory {out} exists and is not empty",
                              hint="choose a new --out, or pass --overwrite to replace it")


# ----------------------------------------------------------------------------------------------------- planning

@dataclass
class Op:
    """One adapter's change to one output tensor."""

    kind: str  # lora | embedding | bias | replace | tokens
    lora: LoraModule | None = None
    replacement: Replacement | None = None
    indices: list[int] | None = None
    key: str | None = None
    fan_in_fan_out: bool = False


class Source:
    """One base checkpoint (plain, 4-bit, or requantized on the fly) with the adapters planned against it."""

    def __init__(self, folder: Path, label: str, adapters_refs: list[AdapterRef], out_dtype: torch.dtype,
                 requantize: QuantSettings | None = None):
        self.folder = Path(folder)
        self.label = label
        self.out_dtype = out_dtype
        self.requantize = requantize
        self.config = read_model_config(self.folder)
        self.kind = check_quantization_config(self.config, self.folder) or "plain"
        self.ckpt = Checkpoint(self.folder)
        self.quant = quantized_weights(self.ckpt.names())
        if self.quant and self.kind == "plain":
            self.kind = "bnb-4bit"
        if self.kind == "bnb-4bit" and not self.quant:
            raise MergeqError(f"{self.folder}: config.json has a bitsandbytes quantization_config but no tensor "
                              "carries a 4-bit quant state", hint="re-save the 4-bit checkpoint with transformers")
        self.aux = {f"{w}.{s}" for w in self.quant
                    for s in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")} | set(self.quant.values())
        for weight, state_key in self.quant.items():  # every quant state is validated before any output
            read_state(self.ckpt, weight, state_key)
        self.base_names = [n for n in self.ckpt.names() if n not in self.aux]
        self.info: ModelInfo = describe(self.config, self.base_names)
        self.shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name in self.base_names:
            self.shapes[name] = quantized_shape(self.ckpt, self.quant[name]) if name in self.quant \
                else self.ckpt.info(name)
        self.adapters = [load_adapter(ref.path, ref.weight, i, self.info.input_embedding)
                         for i, ref in enumerate(adapters_refs)]
        for adapter in self.adapters:
            _check_architecture(adapter, self.config, self.folder)
        self.requantized: set[str] = set()
        if requantize is not None:
            if self.kind != "plain":
                raise MergeqError(f"{self.folder} is already quantized; --requantize needs an fp16/bf16 base")
            self.requantized = {f"{m}.weight" for m, k in self.info.kinds.items()
                                if k in ("linear", "conv1d") and f"{m}.weight" in self.shapes
                                and not any(f"{m}.".startswith(f"{x}.") or f".{x}." in f".{m}." for x in
                                            self.info.not_quantized)}
        self.warnings: list[str] = []
        self._plan()

    # -- names
    @property
    def in_w(self) -> str | None:
        return f"{self.info.input_embedding}.weight" if self.info.input_embedding else None

    @property
    def out_w(self) -> str | None:
        return f"{self.info.output_embedding}.weight" if self.info.output_embedding else None

    def _plan(self) -> None:
        self.virtual_head = bool(self.info.tied and self.out_w and self.out_w not in self.shapes)
        known = set(self.shapes) | ({self.out_w} if self.virtual_head else set())
        self.ops: dict[str, list[tuple[Adapter, Op]]] = {}
        self.base_layers: dict[str, tuple[Adapter, Replacement]] = {}
        unmatched: list[str] = []
        mismatches: list[str] = []
        for adapter in self.adapters:
            for rep in adapter.base_layers.values():
                if rep.tensor not in known:
                    unmatched.append(f"{rep.tensor} (saved base layer, adapter {adapter.path})")
                    continue
                self.base_layers.setdefault(rep.tensor, (adapter, rep))
            for rep in adapter.replacements.values():
                if rep.tensor not in known:
                    unmatched.append(f"{rep.tensor} (modules_to_save, adapter {adapter.path})")
                    continue
                self._add(rep.tensor, adapter, Op("replace", replacement=rep, key=rep.key))
            for lora in adapter.loras.values():
                target = f"{lora.module}.weight"
                if target not in known:
                    unmatched.append(f"{lora.module} (adapter {adapter.path})")
                    continue
                kind = self.info.kind(lora.module)
                fifo = kind == "conv1d" if kind in ("linear", "conv1d") else bool(adapter.config.get("fan_in_fan_out"))
                op_kind = "embedding" if lora.kind == "embedding" else "lora"
                self._add(target, adapter, Op(op_kind, lora=lora, fan_in_fan_out=fifo and op_kind == "lora"))
                if lora.bias_key:
                    bias = f"{lora.module}.bias"
                    if bias not in known:
                        mismatches.append(f"{lora.module}: the adapter trains a bias (lora_bias) but the base "
                                          "module has none")
                    else:
                        self._add(bias, adapter, Op("bias", lora=lora, key=lora.bias_key))
            for tokens in adapter.tokens.values():
                target = f"{tokens.module}.weight"
                if target not in known:
                    unmatched.append(f"{tokens.module} (trainable tokens, adapter {adapter.path})")
                    continue
                op = Op("tokens", indices=tokens.indices, key=tokens.key)
                self._add(target, adapter, op)
                if self.info.tied and target == self.in_w and self.out_w in known:
                    self._add(self.out_w, adapter, op)  # PEFT mirrors token rows onto a tied output embedding
        if unmatched:
            raise MergeqError(
                f"{len(unmatched)} adapter target module(s) match nothing in the base {self.folder}: "
                + "; ".join(unmatched[:MAX_LISTED]) + (" ..." if len(unmatched) > MAX_LISTED else ""),
                hint="the adapter was trained on another model; pass the base it was trained on")
        for adapter, rep in self.base_layers.values():
            self._check_base_layer(adapter, rep, mismatches)
        self.out_shapes: dict[str, tuple[int, ...]] = {}
        for name in sorted(known):
            self.out_shapes[name] = self._check_shapes(name, mismatches)
        if mismatches:
            raise MergeqError(
                f"adapter {', '.join(str(a.path) for a in self.adapters)} does not fit the base {self.folder} "
                f"({len(mismatches)} shape mismatch(es)); first: "
                + "; ".join(mismatches[:MAX_LISTED]),
                hint="the adapter was trained on another base model; pass the base it was trained on")
        self._check_vocab()

    def _add(self, tensor: str, adapter: Adapter, op: Op) -> None:
        ops = self.ops.setdefault(tensor, [])
        if any(a is adapter and o.kind in ("lora", "embedding", "replace") for a, o in ops) \
                and op.kind in ("lora", "embedding", "replace"):
            raise MergeqError(f"adapter {adapter.path} changes {tensor} twice (LoRA and modules_to_save?)")
        ops.append((adapter, op))

    def _base_shape(self, name: str) -> tuple[int, ...]:
        if name in self.base_layers:
            adapter, rep = self.base_layers[name]
            return tuple(adapter.shape(rep.key))
        if name == self.out_w and self.virtual_head:
            return self._base_shape(self.in_w)
        return self.shapes[name][1]

    def _check_base_layer(self, adapter: Adapter, rep: Replacement, mismatches: list[str]) -> None:
        shape = tuple(adapter.shape(rep.key))
        base = self.shapes[rep.tensor][1] if rep.tensor in self.shapes else self._base_shape(self.in_w)
        if len(shape) != len(base) or shape[1:] != base[1:] or shape[0] < base[0]:
            mismatches.append(f"{rep.tensor}: adapter's saved base layer {list(shape)} vs base {list(base)}")
        for other in self.adapters:
            orep = other.base_layers.get(rep.tensor)
            if other is not adapter and orep is not None and tuple(other.shape(orep.key)) != shape:
                raise MergeqError(f"adapters {adapter.path} and {other.path} do not share one base: their saved "
                                  f"{rep.tensor} differ in shape", hint="merge adapters trained on one base only")

    def _check_shapes(self, name: str, mismatches: list[str]) -> tuple[int, ...]:
        base = self._base_shape(name)
        out = base
        for adapter, op in self.ops.get(name, []):
            if op.kind in ("lora", "embedding"):
                lora = op.lora
                a, b = adapter.shape(lora.a_key), adapter.shape(lora.b_key)
                if op.kind == "embedding":
                    want, mag = (a[1], b[0]), (b[0],)
                else:
                    want = (a[1], b[0]) if op.fan_in_fan_out else (b[0], a[1])
                    mag = (b[0],)
                if tuple(base) != want:
                    mismatches.append(f"{lora.module}: base {list(base)}, adapter expects {list(want)}")
                if lora.magnitude_key and tuple(adapter.shape(lora.magnitude_key)) != mag:
                    mismatches.append(f"{lora.module}: DoRA magnitude {list(adapter.shape(lora.magnitude_key))}, "
                                      f"expected {list(mag)}")
            elif op.kind == "bias":
                shape = tuple(adapter.shape(op.key))
                if shape != tuple(base):
                    mismatches.append(f"{name}: base bias {list(base)}, adapter bias {list(shape)}")
            elif op.kind == "replace":
                shape = tuple(adapter.shape(op.key))
                resizable = name in (self.in_w, self.out_w)
                if shape != tuple(base):
                    if not (resizable and len(shape) == len(base) and shape[1:] == tuple(base[1:])):
                        mismatches.append(f"{name}: base {list(base)}, adapter's modules_to_save {list(shape)}")
                    elif name not in self.base_layers and (len(self.ops[name]) > 1 or adapter.weight != 1.0):
                        raise MergeqError(
                            f"adapter {adapter.path} resizes {name} to {shape[0]} rows; combining it with a weight "
                            "or with other adapters needs the resized base layer saved in the adapter",
                            hint="save the adapter with save_embedding_layers=True, or merge it alone with weight 1")
                    out = shape
            elif op.kind == "tokens":
                shape = tuple(adapter.shape(op.key))
                rows = out[0]
                if len(base) != 2 or shape[1:] != tuple(base[1:]):
                    mismatches.append(f"{name}: trainable token rows {list(shape)} vs base {list(base)}")
                elif max(op.indices, default=-1) >= rows or min(op.indices, default=0) < 0:
                    mismatches.append(f"{name}: trainable token index {max(op.indices)} outside {rows} rows")
        return tuple(out)

    def _check_vocab(self) -> None:
        if not (self.in_w and self.out_w) or self.out_w not in self.out_shapes or self.in_w not in self.out_shapes:
            return
        emb, head = self.out_shapes[self.in_w], self.out_shapes[self.out_w]
        if emb[0] != head[0] and not self.virtual_head:
            raise MergeqError(
                f"the adapter gives {self.in_w} {emb[0]} rows but {self.out_w} {head[0]} rows "
                "(resized vocabulary without the matching output layer)",
                hint="save the adapter with modules_to_save=['lm_head', 'embed_tokens'] or save_embedding_layers=True")
        if self.virtual_head and emb[0] != head[0]:
            # a tied head follows the resized embedding unless the adapter gives its own
            self.out_shapes[self.out_w] = emb if self.out_w not in self.ops else head

    # -------------------------------------------------------------------------------------------- computing

    def plain_lora(self, name: str) -> bool:
        """Only plain LoRA products change this 2-D base tensor: it can be merged block of rows by block."""
        ops = self.ops.get(name)
        return bool(ops) and name not in self.base_layers and name not in self.quant \
            and name not in self.requantized and name in self.shapes and len(self.shapes[name][1]) == 2 \
            and not (self.info.tied and name in (self.in_w, self.out_w)) \
            and all(op.kind in ("lora", "embedding") and op.lora.magnitude_key is None for _, op in ops)

    def untouched(self, name: str) -> bool:
        """Copied through as it is (only cast): no adapter, quantization or tied-embedding logic involved."""
        return (name not in self.ops and name not in self.base_layers and name not in self.quant
                and name not in self.requantized and name in self.shapes
                and not (self.info.tied and name in (self.in_w, self.out_w)))

    def base_tensor(self, name: str) -> torch.Tensor:
        """The base's value of one tensor, as a fresh fp32 tensor (dequantized / resized as needed)."""
        if name in self.base_layers:
            adapter, rep = self.base_layers[name]
            tensor = adapter.tensor(rep.key)
            self._check_saved_base(name, tensor, adapter)
            return tensor
        if name == self.out_w and self.virtual_head:
            return self.base_tensor(self.in_w)
        if name in self.quant:
            return dequantize(self.ckpt, name, self.quant[name]).to(torch.float32)
        if name in self.requantized:
            original = self.ckpt.get(name)
            return quantize_dequantize(original, self.requantize).to(torch.float32)
        return self.ckpt.get(name, torch.float32)

    def _check_saved_base(self, name: str, saved: torch.Tensor, adapter: Adapter) -> None:
        real = name if name in self.shapes else self.in_w
        if real in self.quant:
            return
        base = self.ckpt.get(real, torch.float32)
        rows = base.shape[0]
        scale = float(base.abs().max()) + 1e-6
        diff = float((saved[:rows] - base).abs().max())
        if diff > 0.05 * scale:
            raise MergeqError(
                f"adapter {adapter.path} was saved from another base: its {name} differs from {real} in "
                f"{self.folder} by up to {diff:.4g}", hint="pass the base model the adapter was trained on")

    def compute(self, name: str) -> torch.Tensor:
        """The merged fp32 value of one output tensor."""
        base = self.base_tensor(name)
        ops = self.ops.get(name, [])
        if not ops:
            return base
        by_adapter: dict[int, list[Op]] = {}
        owners: dict[int, Adapter] = {}
        for adapter, op in ops:
            by_adapter.setdefault(id(adapter), []).append(op)
            owners[id(adapter)] = adapter
        if len(by_adapter) == 1:
            (key, adapter_ops), = by_adapter.items()
            adapter = owners[key]
            merged = _apply(adapter, adapter_ops, base)
            if adapter.weight == 1.0:
                return merged
            if merged.shape != base.shape:
                raise MergeqError(f"cannot weight adapter {adapter.path}: it resizes {name}")
            merged.sub_(base).mul_(adapter.weight).add_(base)
            return merged
        acc = base.clone()
        for key, adapter_ops in by_adapter.items():
            adapter = owners[key]
            merged = _apply(adapter, adapter_ops, base)
            if merged.shape != base.shape:
                raise MergeqError(f"adapters disagree on the shape of {name}; merge them separately")
            merged.sub_(base)
            acc.add_(merged, alpha=adapter.weight)
            del merged
        return acc

    def close(self) -> None:
        self.ckpt.close()
        for adapter in self.adapters:
            adapter.close()


def _apply(adapter: Adapter, ops: list[Op], base: torch.Tensor) -> torch.Tensor:
    """Adapter `ops` applied to `base` exactly as PEFT's merge would (fp32); `base` is not modified."""
    current = base
    for op in ops:
        if op.kind in ("lora", "embedding"):
            current = _apply_lora(adapter, op, current, base)
        elif op.kind == "bias":
            current = current + op.lora.scale * adapter.tensor(op.key)
        elif op.kind == "replace":
            current = adapter.tensor(op.key)
        elif op.kind == "tokens":
            current = current.clone() if current is base else current
            current[torch.tensor(op.indices, dtype=torch.int64)] = adapter.tensor(op.key)
    return current if current is not base else base.clone()


def _apply_lora(adapter: Adapter, op: Op, current: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    lora = op.lora
    a = adapter.tensor(lora.a_key)
    b = adapter.tensor(lora.b_key)
    transposed = op.kind == "embedding" or op.fan_in_fan_out  # weight is stored (in, out) / (vocab, dim)
    if lora.magnitude_key is None:  # W + scale * B @ A in one fused pass (transposed: A^T B^T = (B A)^T)
        return torch.addmm(current, a.T, b.T, alpha=lora.scale) if transposed else \
            torch.addmm(current, b, a, alpha=lora.scale)
    delta = b @ a  # (out, in) for linear; (dim, vocab) for an embedding
    delta.mul_(lora.scale)
    del a, b
    # DoRA: rescale each output row (column of the stored weight when transposed) to the trained magnitude;
    # the norm is taken on the unmerged base weight plus this adapter's delta, as PEFT does.
    magnitude = adapter.tensor(lora.magnitude_key)
    base_c = base.T if transposed else base
    norm = torch.linalg.norm(base_c + delta, dim=1)
    factor = (magnitude / norm).view(-1, 1)
    current_c = current.T if transposed else current
    merged = factor * (current_c + delta)
    return merged.T.contiguous() if transposed else merged


# ------------------------------------------------------------------------------------------------------ running

def _check_architecture(adapter, base_config: dict, folder: Path) -> None:
    """Refuse an adapter whose recorded base (a local folder with a config.json) is another architecture than
    `folder`: the shapes may agree (Llama and Mistral do) while the merged model would be wrong."""
    recorded = adapter.config.get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded or not Path(recorded).is_absolute():
        return
    try:
        trained = json.loads((Path(recorded) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # a hub id or a folder that is gone: nothing to compare with
    if not isinstance(trained, dict):
        return

    def describe_arch(cfg: dict) -> tuple[str | None, str | None]:
        arches = cfg.get("architectures") or [None]
        return (arches[0] if isinstance(arches, list) and arches else None), cfg.get("model_type")

    (t_arch, t_type), (b_arch, b_type) = describe_arch(trained), describe_arch(base_config)
    if (t_arch and b_arch and t_arch != b_arch) or (t_type and b_type and t_type != b_type):
        raise MergeqError(
            f"adapter {adapter.path} was trained on {recorded} ({t_arch}, model_type {t_type}), but the base "
            f"{folder} is {b_arch} (model_type {b_type}) (from their config.json files): the tensor shapes may "
            "agree, the models do not",
            hint="pass the base the adapter was trained on")


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _check_values(name: str, value: torch.Tensor, out_dtype: torch.dtype, what: str = "merged tensor") -> None:
    """Finite, and within float16's range when writing float16 (one pass: aminmax propagates NaN)."""
    if not value.numel():
        return
    lo, hi = (float(x) for x in torch.aminmax(value))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(value)).sum())
        raise MergeqError(f"{what} {name} has {bad} NaN or Inf value(s)",
                          hint="check the base and adapter for NaN/Inf, and the adapter weights")
    peak = max(-lo, hi)
    if out_dtype == torch.float16 and peak > FP16_MAX:
        raise MergeqError(f"{what} {name} reaches {peak:.6g}, beyond float16's largest value 65504",
                          hint="use --dtype bfloat16")


def _finalize(name: str, value: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    _check_values(name, value, out_dtype)
    return value.to(out_dtype)


def _lora_parts(source: Source, name: str, out_dtype: torch.dtype):
    """W + sum_i weight_i * scale_i * B_i A_i, block of rows by block of rows, straight from the memory map.

    Each block is converted to fp32, gets every adapter's product added in place, is checked and cast: the
    fp32 work happens in cache-sized pieces and the whole tensor is never in memory.
    """
    factors = []
    for adapter, op in source.ops[name]:
        a = adapter.tensor(op.lora.a_key)
        b = adapter.tensor(op.lora.b_key)
        transposed = op.kind == "embedding" or op.fan_in_fan_out  # stored (in, out): rows of A^T B^T
        left, right = (a.T.contiguous(), b.T.contiguous()) if transposed else (b, a)
        factors.append((left, right, op.lora.scale * adapter.weight))
    dtype, shape = source.ckpt.info(name)
    cols = shape[1]
    rows_per_block = max(1, BLOCK_FLOATS // cols)
    first = 0
    for part in source.ckpt.chunks(name, rows_per_block * cols * part_size(dtype)):
        block = part.reshape(-1, cols).to(torch.float32, copy=True)  # never write into the read-only map
        last = first + block.shape[0]
        for left, right, alpha in factors:
            block.addmm_(left[first:last], right, alpha=alpha)
        out = block.to(out_dtype)
        lo, hi = torch.aminmax(out)  # checking the cast block is enough: overflow and NaN both end up non-finite
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            _check_values(name, block, out_dtype)  # names the cause (NaN/Inf, or beyond float16)
        yield out
        first = last


def part_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _copy_parts(source: Source, name: str, out_dtype: torch.dtype):
    """An unchanged tensor, piece by piece from the memory map: checked, cast, never whole in memory."""
    for part in source.ckpt.chunks(name):
        if part.dtype.is_floating_point:
            _check_values(name, part, out_dtype, what="base tensor")
            yield part.to(out_dtype)
        else:
            yield part


def stream_merge(source: Source, folder: Path, max_shard_bytes: int) -> dict:
    """Merge `source` into `folder` (already existing, empty): shards + index. Returns facts for the manifest."""
    out_dtype = source.out_dtype
    names = [n for n in source.base_names]
    tie_kept = source.info.tied
    write_head = False
    if source.virtual_head:
        touched = source.out_w in source.ops or source.in_w in source.ops or source.out_w in source.base_layers \
            or source.in_w in source.base_layers
        if touched:
            emb = _finalize(source.in_w, source.compute(source.in_w), out_dtype)
            head = _finalize(source.out_w, source.compute(source.out_w), out_dtype)
            write_head = emb.shape != head.shape or not torch.equal(emb, head)
            del emb, head
        if write_head:
            names.append(source.out_w)
            tie_kept = False
    planned = []
    for name in names:
        dtype, _ = source.shapes.get(name, source.shapes.get(source.in_w))
        shape = source.out_shapes.get(name) or source.shapes[name][1]
        planned.append(OutTensor(name, out_dtype if _is_float(dtype) else dtype, tuple(shape)))
    writer = ShardWriter(folder, max_shard_bytes, plan=planned)
    written_sums: dict[str, torch.Tensor] = {}
    try:
        for spec in track(planned, f"merging into {out_dtype}".replace("torch.", "")):
            if source.untouched(spec.name):
                writer.write_parts(spec.name, _copy_parts(source, spec.name, out_dtype))
                continue
            if source.plain_lora(spec.name):
                writer.write_parts(spec.name, _lora_parts(source, spec.name, out_dtype))
                continue
            if _is_float(spec.dtype):
                value = _finalize(spec.name, source.compute(spec.name), out_dtype)
            else:
                value = source.ckpt.get(spec.name)
            if tie_kept and spec.name in (source.in_w, source.out_w) and not source.virtual_head:
                written_sums[spec.name] = value.clone()
            writer.write(spec.name, value)
            del value
        index = writer.finish()
    except BaseException:
        writer.abort()
        raise
    if len(written_sums) == 2:  # a tied pair stored twice: still tied only if the merge left them equal
        a, b = written_sums.values()
        tie_kept = a.shape == b.shape and torch.equal(a, b)
    vocab = source.out_shapes.get(source.in_w, (None,))[0] if source.in_w else None
    return {"index": index, "shards": writer.names, "tied": tie_kept, "vocab_size": vocab,
            "lm_head_written_separately": write_head}


def _write_config(source: Source, folder: Path, facts: dict, dtype_name: str) -> dict:
    config = json.loads(json.dumps(source.config))
    config.pop("quantization_config", None)
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    if facts["vocab_size"] is not None and config.get("vocab_size") not in (None, facts["vocab_size"]):
        config["vocab_size"] = facts["vocab_size"]
    if source.info.tied and not facts["tied"]:
        config["tie_word_embeddings"] = False
    write_json(folder / "config.json", config)
    return config


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op thread count for the duration of the block, then back to what it was."""
    previous = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _created_parents(out: Path) -> list[Path]:
    missing = []
    parent = Path(out).resolve().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def run_merge(config: MergeConfig) -> MergeResult:
    """Merge, validate and write `config.out` atomically; on any error nothing is left behind."""
    if config.out is None:
        raise MergeqError("no output folder given", hint="pass --out DIR")
    refs = config.adapter_refs()
    if not refs:
        raise MergeqError("no adapter given", hint="pass --adapter PATH (several allowed, PATH@WEIGHT to weight)")
    if config.dtype not in OUT_DTYPES:
        raise MergeqError(f"--dtype {config.dtype!r} is not one of float16, bfloat16")
    if config.base is None and config.qlora_base is None:
        raise MergeqError("no base given", hint="pass --base (fp16/bf16 or bitsandbytes 4-bit) and/or --qlora-base")
    out = Path(config.out)
    inputs = [Path(p) for p in (config.base, config.qlora_base) if p is not None] + [r.path for r in refs]
    check_output(out, inputs, config.overwrite)
    created = _created_parents(out)
    try:
        return _run(config, refs, out)
    except BaseException:
        for folder in created:  # parents made for the output; removed only if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _is_4bit_folder(folder: Path) -> bool:
    config = read_model_config(folder)
    return check_quantization_config(config, folder) == "bnb-4bit"


def qlora_decision(config: MergeConfig, refs: list[AdapterRef]) -> Decision:
    """Which base the adapters are merged into: the evidence of QLoRA training and --qlora (merge.qlora_detect)."""
    evidence = []
    for ref in refs:
        if Path(ref.path).is_dir():
            evidence += adapter_evidence(ref.path, read_config(ref.path))
    given = None
    if config.qlora_base is not None:
        given = (Path(config.qlora_base), "--qlora-base")
    elif config.base is not None and _is_4bit_folder(Path(config.base)):
        given = (Path(config.base), "--base")
    if given is not None:
        evidence.append(user_base_evidence(given[0], None, given[1]))
    if config.requantize is not None and given is None:
        s = config.requantize
        return Decision("explicit", True, s, f"fp16 base requantized to {s.quant_type}"
                        + (" (double quant)" if s.double_quant else ""), evidence, [],
                        "quantization settings given explicitly (--requantize)")
    return decide(config.qlora, evidence, has_4bit_base=given is not None, double_quant=config.double_quant)


def _run(config: MergeConfig, refs: list[AdapterRef], out: Path) -> MergeResult:
    out_dtype = OUT_DTYPES[config.dtype]
    decision = qlora_decision(config, refs)
    log.info("merge target: %s (%s)", decision.target, decision.why)  # its warnings are logged with the others
    requantize = decision.settings if config.qlora_base is None else None
    candidates: list[tuple[str, Path, QuantSettings | None]] = []
    if config.qlora_base is not None:
        candidates.append(("qlora-base", Path(config.qlora_base), None))
    if config.base is not None:
        candidates.append(("base", Path(config.base), requantize))
    sources: list[Source] = []
    try:
        for label, folder, requant in candidates:
            sources.append(Source(folder, label, refs, out_dtype, requant))
        for adapter in sources[0].adapters:
            adapter.check_finite()
    except BaseException:
        for source in sources:
            source.close()
        raise
    warnings: list[str] = [f"QLoRA: {w}" for w in decision.warnings]
    recorded = {a.config.get("base_model_name_or_path") for a in sources[0].adapters} - {None, ""}
    if len(recorded) > 1:
        warnings.append("the adapters record different bases (" + ", ".join(sorted(map(str, recorded)))
                        + "); their shapes fit this base, but task arithmetic assumes one shared base")
    # input hashes for the manifest: read in a background thread while the merge streams (hashlib drops the GIL)
    hasher = ThreadPoolExecutor(max_workers=1)
    hashing = {folder: hasher.submit(manifest_mod.folder_hashes, folder)
               for folder in dict.fromkeys([s.folder for s in sources] + [r.path for r in refs])}
    result_validation = None
    fidelity = None
    try:
        exists_empty = out.exists()
        with atomic_dir(out, overwrite=config.overwrite or exists_empty) as tmp:
            chosen = sources[0]
            if len(sources) > 1:  # measured before anything is written; only the chosen merge is written
                choice = _choose(config, refs, sources)
                fidelity = choice.describe()
                warnings.extend(choice.warnings)
                chosen = next(s for s in sources if s.label == choice.chosen)
            with _torch_threads(config.threads):
                facts = {chosen.label: stream_merge(chosen, tmp, config.max_shard_bytes)}
            _write_config(chosen, tmp, facts[chosen.label], config.dtype)
            if config.validate:
                from merge import validate as validate_mod

                reference_base = Path(config.qlora_base) if config.qlora_base else Path(config.base)
                reference = validate_mod.Reference(base=reference_base, adapters=refs,
                                                   vocab_size=facts[chosen.label]["vocab_size"],
                                                   tokenizer_dirs=_tokenizer_dirs(config, refs),
                                                   quantize=None if config.qlora_base else requantize)
                outcome = validate_mod.compare_candidates(reference, {chosen.label: tmp}, config.kl_warn,
                                                          config.logit_warn)
                warnings.extend(outcome.warnings)
                result_validation = outcome.results[chosen.label]
            else:
                warnings.append("validation skipped (--no-validate)")
            chosen_facts = facts[chosen.label]
            aux = copy_aux_files([Path(p) for p in (config.base, config.qlora_base) if p is not None], tmp,
                                 tokenizer_from=[r.path for r in refs])
            for source in sources:
                warnings.extend(source.warnings)
            manifest = manifest_mod.build(
                config=config, chosen=chosen, sources=sources, facts=chosen_facts, aux=aux,
                adapters=[describe_adapter(a) for a in chosen.adapters],
                validation=result_validation, fidelity=fidelity, warnings=warnings, qlora=decision.describe(),
                hashes={folder: future.result() for folder, future in hashing.items()})
            write_json(tmp / manifest_mod.MANIFEST_NAME, manifest)
    finally:
        hasher.shutdown(wait=True, cancel_futures=True)
        for source in sources:
            source.close()
    for warning in warnings:
        log.warning("%s", warning)
    return MergeResult(out=out, manifest=manifest, warnings=warnings, shards=chosen_facts["shards"],
                       validation=result_validation)


def _tokenizer_dirs(config: MergeConfig, refs: list[AdapterRef]) -> list[Path]:
    return [r.path for r in refs] + [Path(p) for p in (config.base, config.qlora_base) if p]


def _choose(config: MergeConfig, refs: list[AdapterRef], sources: list[Source]):
    """Both an fp16 and a 4-bit base: score both merges against the trained model on the evaluation text."""
    from merge.target import choose_target

    if config.eval_text is None:
        raise MergeqError("--base and --qlora-base: the merge target is chosen by measuring both merges against "
                          "the trained model on an evaluation text, and none was given",
                          hint="pass --eval-text FILE (text like what the model will see in use; .txt, .jsonl, "
                               ".parquet:COLUMN), or pass only one base")
    reference = Source(Path(config.qlora_base), "reference", refs, torch.float32, None)
    try:
        return choose_target(sources, reference, Path(config.eval_text), _tokenizer_dirs(config, refs))
    finally:
        reference.close()
