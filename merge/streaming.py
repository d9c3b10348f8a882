"""Streaming: the planned merge of a Source (merge/source.py) written tensor by tensor into shards.

Each base tensor is read from the memory map (dequantizing 4-bit ones), gets every adapter in fp32, is checked
(finite, fits the output dtype), cast once and appended to the current output shard (mergeq.core.shards).
Untouched tensors and tensors changed only by plain LoRA products never exist whole in memory: they are read,
merged and written a cache-sized block of rows at a time. Memory holds a few copies of one tensor at a time,
whatever the number of layers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from merge.source import Source
from mergeq.core.errors import MergeqError
from mergeq.core.progress import track
from mergeq.core.safetensors_file import itemsize
from mergeq.core.shards import OutTensor, ShardWriter

FP16_MAX = 65504.0
BLOCK_FLOATS = 1 << 18  # fp32 values per block of rows in the row-blocked LoRA merge (1 MiB: stays in cache)


def check_values(name: str, value: torch.Tensor, out_dtype: torch.dtype, what: str = "merged tensor") -> None:
    """Finite, and within float16's range when writing float16 (one pass: aminmax propagates NaN)."""
    if not value.numel():
        return
    lo, hi = (float(x) for x in torch.aminmax(value))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(value)).sum())
        raise MergeqError(
            f"{what} {name} has {bad} NaN or Inf value(s)",
            hint="check the base and adapter for NaN/Inf, and the adapter weights",
        )
    peak = max(-lo, hi)
    if out_dtype == torch.float16 and peak > FP16_MAX:
        raise MergeqError(
            f"{what} {name} reaches {peak:.6g}, beyond float16's largest value 65504", hint="use --dtype bfloat16"
        )


def finalize(name: str, value: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """A merged fp32 tensor checked and cast to the output dtype, as it is written."""
    check_values(name, value, out_dtype)
    return value.to(out_dtype)


def lora_parts(source: Source, name: str, out_dtype: torch.dtype):
    """W + sum_i weight_i * scale_i * B_i A_i, block of rows by block of rows, straight from the memory map.

    Each block is converted to fp32, gets every adapter's product added in place, is checked and cast: the
    fp32 work happens in cache-sized pieces and the whole tensor is never in memory.
    """
    factors = []
    for adapter, op in source.ops[name]:
        left, right, scale = op.factors(adapter)
        factors.append((left, right, scale * adapter.weight))
    dtype, shape = source.ckpt.info(name)
    cols = shape[1]
    rows_per_block = max(1, BLOCK_FLOATS // cols)
    first = 0
    for part in source.ckpt.chunks(name, rows_per_block * cols * itemsize(dtype)):
        block = part.reshape(-1, cols).to(torch.float32, copy=True)  # never write into the read-only map
        last = first + block.shape[0]
        for left, right, alpha in factors:
            block.addmm_(left[first:last], right, alpha=alpha)
        out = block.to(out_dtype)
        lo, hi = torch.aminmax(out)  # checking the cast block is enough: overflow and NaN both end up non-finite
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            check_values(name, block, out_dtype)  # names the cause (NaN/Inf, or beyond float16)
        yield out
        first = last


def copy_parts(source: Source, name: str, out_dtype: torch.dtype):
    """An unchanged tensor, piece by piece from the memory map: checked, cast, never whole in memory."""
    for part in source.ckpt.chunks(name):
        if part.dtype.is_floating_point:
            check_values(name, part, out_dtype, what="base tensor")
            yield part.to(out_dtype)
        else:
            yield part


def merged_vocab(source: Source) -> int | None:
    """The merged model's vocabulary size (rows of its input embedding, resized by an adapter where it is)."""
    return source.out_shapes.get(source.in_w, (None,))[0] if source.in_w else None


def stream_merge(source: Source, folder: Path, max_shard_bytes: int) -> dict:
    """Merge `source` into `folder` (already existing, empty): shards + index. Returns facts for the manifest."""
    out_dtype = source.out_dtype
    names = [n for n in source.base_names]
    tie_kept = source.info.tied
    write_head = False
    if source.virtual_head:
        touched = (
            source.out_w in source.ops
            or source.in_w in source.ops
            or source.out_w in source.base_layers
            or source.in_w in source.base_layers
        )
        if touched:
            emb = finalize(source.in_w, source.compute(source.in_w), out_dtype)
            head = finalize(source.out_w, source.compute(source.out_w), out_dtype)
            write_head = emb.shape != head.shape or not torch.equal(emb, head)
            del emb, head
        if write_head:
            names.append(source.out_w)
            tie_kept = False
    planned = []
    for name in names:
        dtype, _ = source.shapes.get(name, source.shapes.get(source.in_w))
        shape = source.out_shapes.get(name) or source.shapes[name][1]
        planned.append(OutTensor(name, out_dtype if dtype.is_floating_point else dtype, tuple(shape)))
    writer = ShardWriter(folder, max_shard_bytes, plan=planned)
    written_sums: dict[str, torch.Tensor] = {}
    try:
        for spec in track(planned, f"merging into {out_dtype}".replace("torch.", "")):
            if source.untouched(spec.name):
                writer.write_parts(spec.name, copy_parts(source, spec.name, out_dtype))
                continue
            if source.plain_lora(spec.name):
                writer.write_parts(spec.name, lora_parts(source, spec.name, out_dtype))
                continue
            if spec.dtype.is_floating_point:
                value = finalize(spec.name, source.compute(spec.name), out_dtype)
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
    vocab = merged_vocab(source)
    return {
        "index": index,
        "shards": writer.names,
        "tied": tie_kept,
        "vocab_size": vocab,
        "lm_head_written_separately": write_head,
    }
