"""What a run will cost before it starts: predicted peak memory and disk of every stage, from the base's shapes.

The predictions follow how each stage works, not a fit: every stage streams one decoder layer at a time, so
its memory is a fixed runtime cost plus a few copies of the largest layer or tensor, plus what the stage keeps
beside it (calibration activations for int4, the memory-mapped model for llama.cpp's tools). Disk is the size
of what the stage writes (and, for GGUF, its intermediate file). `mergeq run --check` prints them; every run
refuses to start when the free disk cannot hold the outputs of the stages that still have to run.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from mergeq.core.errors import MergeqError
from mergeq.core.memory import LLAMA_LOGITS_BUDGET_BYTES, LLAMACPP_RUNTIME_BYTES, LOGITS_BUDGET_BYTES
from mergeq.core.paths import free_bytes

log = logging.getLogger(__name__)

GIB = 1 << 30
RUNTIME_BYTES = 1 * GIB  # python, torch and transformers loaded, measured at 0.5-0.9 GiB here: rounded up
# bits per weight of llama.cpp's tensor types (block bytes * 8 / block weights, from ggml's type table)
GGUF_BPW = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.5625,
    "Q5_K": 5.5,
    "Q5_0": 5.5,
    "Q5_1": 6.0,
    "Q4_K": 4.5,
    "Q4_0": 4.5,
    "Q4_1": 5.0,
    "IQ4_NL": 4.5,
    "IQ4_XS": 4.25,
    "Q3_K": 3.4375,
    "IQ3_S": 3.4375,
    "IQ3_XXS": 3.0625,
    "Q2_K": 2.625,
    "IQ2_S": 2.5625,
    "IQ2_XS": 2.3125,
    "IQ2_XXS": 2.0625,
    "IQ1_M": 1.75,
    "IQ1_S": 1.5625,
    "TQ1_0": 1.6875,
    "TQ2_0": 2.0625,
    "MXFP4": 4.25,
    "Q1_0": 1.125,
    "Q2_0": 2.125,
}
MIX_MARGIN = 1.25  # named mixes put some tensors in larger types (Q6_K, Q8_0 fallbacks): an upper margin
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Shapes:
    """The base checkpoint as the budget sees it."""

    params: int
    matrix_params: int  # 2-D tensors
    largest_tensor: int  # elements
    largest_layer: int  # elements of the largest decoder layer
    hidden: int
    vocab: int
    widest_input: int = 0  # the largest in_features of a decoder layer's matrices (GPTQ's Hessian is its square)
    largest_linear: int = 0  # elements of the largest matrix inside a decoder layer
    layer_matrix_params: int = 0  # elements of the matrices inside decoder layers (what int4 quantizes)


@dataclass(frozen=True)
class StageBudget:
    stage: str
    peak_bytes: int
    disk_bytes: int  # on disk while the stage runs, at most
    basis: str  # what the prediction counts, in words
    kept_bytes: int | None = None  # what stays when it is done (its outputs); None: all of disk_bytes

    @property
    def kept(self) -> int:
        return self.disk_bytes if self.kept_bytes is None else self.kept_bytes


def read_shapes(model_dir: Path) -> Shapes:
    from mergeq.core.checkpoint import Checkpoint
    from mergeq.core.modelfiles import read_model_config

    checkpoint = Checkpoint(Path(model_dir))
    total = matrices = largest = 0
    layers: dict[int, int] = {}
    widest = linear = layer_matrices = 0
    for name in checkpoint.names():
        _, shape = checkpoint.info(name)
        numel = 1
        for dim in shape:
            numel *= dim
        total += numel
        matrices += numel if len(shape) == 2 else 0
        largest = max(largest, numel)
        if match := _LAYER.search(name):
            layers[int(match.group(1))] = layers.get(int(match.group(1)), 0) + numel
            if len(shape) == 2:
                widest = max(widest, shape[1])
                linear = max(linear, numel)
                layer_matrices += numel
    config = read_model_config(model_dir)
    text = config.get("text_config", config)
    return Shapes(
        total,
        matrices,
        largest,
        max(layers.values(), default=largest),
        int(text.get("hidden_size", 0)),
        int(text.get("vocab_size", 0)),
        widest,
        linear,
        layer_matrices,
    )


def stage_budgets(config, shapes: Shapes) -> list[StageBudget]:
    """Predicted peak memory and disk of each stage of `config` (a PipelineConfig) on a base of `shapes`."""
    fp32, fp16 = 4, 2
    merged_bytes = shapes.params * fp16
    # evaluation logits: a group of windows within LOGITS_BUDGET_BYTES, at least one 512-token window
    # (mergeq.core.streaming.logits_blocks), and its log-softmax beside it
    logits = 2 * max(LOGITS_BUDGET_BYTES, 512 * shapes.vocab * fp32)
    # a streamed forward (validation, evaluation): one decoder layer as stored, one of its matrices cast to fp32
    layer = shapes.largest_layer * fp16 + (shapes.largest_linear or shapes.largest_tensor) * fp32
    budgets = [
        StageBudget(
            "merge",
            RUNTIME_BYTES + max(shapes.largest_tensor * fp16, layer + logits),
            merged_bytes,
            "runtime + the larger of: the largest tensor in the output dtype (an upper bound: the merge writes in "
            "row blocks), or one decoder layer as stored with one matrix in fp32 and the evaluation logits "
            "(streamed validation and reference evaluation)",
        )
    ]
    for target, options in config.exports.items():
        if target == "gguf":
            sizes = [_gguf_bytes(shapes, quant) for quant in options.quants]
            # a size target: its mix and the named mix written beside it if the mix measures worse; the
            # search holds one Q8_0-size round and one mix at a time (exporters.gguf_preflight.check_disk)
            sizes += [2 * _gguf_bytes(shapes, "Q8_0") for _ in options.targets]
            search = [2 * _gguf_bytes(shapes, "Q8_0")] if options.targets else []
            intermediate = shapes.params * fp16
            budgets.append(
                StageBudget(
                    "gguf",
                    max(
                        RUNTIME_BYTES + 2 * shapes.largest_tensor * fp32,
                        LLAMACPP_RUNTIME_BYTES + shapes.largest_tensor * (2 * fp16 + fp32),
                        LLAMACPP_RUNTIME_BYTES + max(sizes + search) + LLAMA_LOGITS_BUDGET_BYTES,
                    ),
                    intermediate + sum(sizes + search),
                    f"the largest of: the converter (runtime + 2 x largest tensor in fp32); llama-quantize (its "
                    f"runtime + the largest tensor mapped, in fp32 and quantized); llama-perplexity (its runtime, "
                    f"the largest file, mapped: its pages stay resident where memory allows, and a batch of "
                    f"logits). Disk: the f16 intermediate ({intermediate / GIB:.2f} GiB, removed when the stage "
                    f"ends) and the files {', '.join(options.quants)}",
                    sum(sizes),
                )
            )
        elif target in ("awq", "gptq", "rtn"):
            activations = options.samples * options.seq_len * shapes.hidden * fp32 * 2  # layer inputs and outputs
            group = options.group_size or 128
            # the decoder layers' linears; the embeddings and lm_head stay 16-bit
            quantized = shapes.layer_matrix_params or shapes.matrix_params
            layers = quantized * (options.bits / 8 + 2 * fp16 / group)
            int4 = layers + (shapes.params - quantized) * fp16
            # while it runs, the per-layer checkpoints (exporters/int4/resume.py) hold another copy of the layers'
            # int4 tensors and one layer's outputs on disk; saving those outputs serializes them once in memory
            # GPTQ: the Hessian of the widest linear, permuted and factored in its own buffer (exporters/int4/gptq.py)
            hessians = shapes.widest_input**2 * fp32 if target == "gptq" else 0
            budgets.append(
                StageBudget(
                    target,
                    RUNTIME_BYTES + 3 * shapes.largest_layer * fp32 + activations * 3 // 2 + hessians + logits,
                    int(int4 + layers + activations // 2),
                    f"runtime + 3 x largest layer in fp32 + calibration activations ({options.samples} x "
                    f"{options.seq_len} x {shapes.hidden}, in and out, fp32, and one serialized copy)"
                    f"{f' + GPTQ matrix of {shapes.widest_input}^2 fp32' if hessians else ''} + evaluation "
                    f"logits of one window and their log-softmax; disk: the checkpoint, and its per-layer resume copy "
                    f"while the stage runs",
                    int(int4),
                )
            )
    return budgets


def _gguf_bytes(shapes: Shapes, quant: str) -> int:
    from exporters.llamacpp.pin import load_pin

    tensor_type = load_pin().default_types.get(quant, quant)
    bpw = GGUF_BPW.get(tensor_type, 16.0)
    margin = MIX_MARGIN if quant != tensor_type or quant.endswith(("_M", "_L", "_S")) else 1.0
    return int((shapes.matrix_params * bpw / 8 * margin) + (shapes.params - shapes.matrix_params) * 4)


def disk_needed(budgets: list[StageBudget], one_at_a_time: bool = True) -> int:
    """The most disk the stages need at once: everything they keep, plus the largest transient files of one
    stage (the GGUF intermediate, an int4 stage's per-layer copy) when stages run one at a time, or of all of
    them when they may run together (Ray)."""
    transient = [b.disk_bytes - b.kept for b in budgets]
    return sum(b.kept for b in budgets) + (max(transient, default=0) if one_at_a_time else sum(transient))


def check_disk(budgets: list[StageBudget], out: Path, pending: list[str], one_at_a_time: bool = True) -> None:
    """Refuse before any work when the stages still to run cannot fit on the output's disk."""
    need = disk_needed([b for b in budgets if b.stage in pending], one_at_a_time)
    free = free_bytes(out)
    if need > free:
        raise MergeqError(
            f"the output disk of {out} has {free / GIB:.2f} GiB free, and the stages still to run "
            f"({', '.join(pending)}) are predicted to need {need / GIB:.2f} GiB at once",
            hint="free space there, choose another --out, or export fewer formats (mergeq run --check lists "
            "each stage's share)",
        )


def format_table(budgets: list[StageBudget], out: Path) -> str:
    lines = [f"{'stage':<6} {'peak memory':>12} {'disk':>10} {'kept':>10}  basis"]
    for b in budgets:
        lines.append(
            f"{b.stage:<6} {b.peak_bytes / GIB:>8.2f} GiB {b.disk_bytes / GIB:>6.2f} GiB {b.kept / GIB:>6.2f} GiB"
            f"  {b.basis}"
        )
    lines.append(
        f"disk needed at once {disk_needed(budgets) / GIB:.2f} GiB (stages one at a time; all kept: "
        f"{sum(b.kept for b in budgets) / GIB:.2f} GiB); free on {out}'s disk: {free_bytes(out) / GIB:.2f} GiB; "
        f"largest peak {max(b.peak_bytes for b in budgets) / GIB:.2f} GiB"
    )
    return "\n".join(lines)
