"""From measured errors to predicted KL: per-group scales fitted on real KL of a few whole-model mixes.

The relative error of a tensor says how much its output moves, not how much the model's next-token
distribution moves: that depends on where the tensor sits (a query projection feeds a softmax, a down
projection the residual stream, the embedding every position). So tensors are grouped by role, and for each
group the search measures one probe mix: every tensor at Q8_0 except the group's, which take a low type.
With KL(mix) ~ sum over tensors of scale[group] * error(tensor, type):

    scale[g] = (KL(probe g) - KL(all Q8_0)) / (error sum of g in probe g - error sum of g at Q8_0)

plus an intercept: the all-Q8_0 mix's KL beyond what its own errors predict.

KL is measured by the pinned llama-perplexity (--kl-divergence) against the f16 intermediate's own logits
on the calibration text (its first `chunks` windows), so the search needs no torch model.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from exporters.gguf_budget.slots import Slot
from exporters.llamacpp.build import tool_command
from exporters.llamacpp.run import run_tool

log = logging.getLogger(__name__)

# role -> calibration group; roles not named here share "other"
GROUPS = {
    "attn_q": "attn_qk",
    "attn_k": "attn_qk",
    "attn_qkv": "attn_qkv",
    "attn_v": "attn_vo",
    "attn_output": "attn_vo",
    "ffn_gate": "ffn_in",
    "ffn_up": "ffn_in",
    "ffn_down": "ffn_down",
    "token_embd": "token_embd",
    "output": "output",
}
PROBE_BITS = 4.0  # a probe gives its group the smallest candidate of at least this many bits per weight
KL_ATTEMPTS = 4  # the search runs llama-perplexity a dozen times; its lost log tails (evaluate.py) add up
MIN_SCALE_SHARE = 0.05  # a group whose probe moved KL by (about) nothing gets this share of the median scale


def group_of(slot: Slot) -> str:
    return GROUPS.get(slot.role, "other")


@dataclass
class KLBase:
    """The f16 logits that probes are compared with (llama-perplexity's --kl-divergence-base file)."""

    path: Path
    n_ctx: int
    chunks: int
    seconds: float


@dataclass
class Measured:
    kl: float
    top1: float
    ppl: float
    seconds: float


def _flags(n_ctx: int, chunks: int, threads: int | None) -> list[str]:
    # llama-perplexity's KL pass stops without statistics when a batch holds more sequences than there are chunks
    flags = ["-c", str(n_ctx), "-b", str(n_ctx * max(1, min(chunks, 2048 // n_ctx))), "--chunks", str(chunks)]
    return flags + (["-t", str(threads)] if threads else [])


def kl_base(intermediate: Path, text: Path, out: Path, n_ctx: int, chunks: int, threads: int | None) -> KLBase:
    result = run_tool(
        tool_command(
            "llama-perplexity",
            "-m",
            intermediate,
            "-f",
            text,
            "--kl-divergence-base",
            out,
            *_flags(n_ctx, chunks, threads),
        ),
        hint=f"the calibration text {text} needs at least 2 x {n_ctx} tokens",
    )
    found = re.findall(r"computing over (\d+) chunks", result.stdout + result.stderr)
    return KLBase(out, n_ctx, int(found[-1]) if found else chunks, result.seconds)


def measure_kl(gguf: Path, base: KLBase, threads: int | None) -> Measured:
    from exporters.eval_gguf import run_kl_divergence

    stats, result = run_kl_divergence(
        tool_command(
            "llama-perplexity",
            "-m",
            gguf,
            "--kl-divergence-base",
            base.path,
            "--kl-divergence",
            *_flags(base.n_ctx, base.chunks, threads),
        ),
        gguf,
        attempts=KL_ATTEMPTS,
    )
    return Measured(stats["kl_divergence"], stats["top1_percent"] / 100, stats["perplexity"], result.seconds)


def probe_types(
    slots: list[Slot], errors: dict[str, dict[str, float]], bits: dict[str, float], group: str
) -> dict[str, str]:
    """All slots at their highest-bit type (Q8_0 by default) except `group`'s, at their probe type."""
    types = {}
    for slot in slots:
        options = errors[slot.name]
        if group_of(slot) == group:
            low = [t for t in options if bits[t] >= PROBE_BITS] or list(options)
            types[slot.name] = min(low, key=lambda t: (bits[t], options[t], t))
        else:
            types[slot.name] = max(options, key=lambda t: (bits[t], -options[t], t))
    return types


def error_sum(slots: list[Slot], errors: dict[str, dict[str, float]], types: dict[str, str], group: str) -> float:
    return sum(errors[s.name][types[s.name]] for s in slots if group_of(s) == group)


@dataclass
class Calibration:
    scales: dict[str, float]  # group -> KL per unit of summed relative error
    probes: dict[str, dict] = field(default_factory=dict)  # group (or "q8_0") -> its measurements
    # KL that no weight error explains: what the all-Q8_0 mix measures beyond its predicted part (llama.cpp also
    # quantizes the activations of a quantized matrix product, so any quantized mix has it)
    intercept: float = 0.0

    def predict(self, slots: list[Slot], errors: dict[str, dict[str, float]], types: dict[str, str]) -> float:
        return self.intercept + sum(self.scales[group_of(s)] * errors[s.name][types[s.name]] for s in slots)


def fit(slots, errors, baseline: dict, probes: dict[str, dict]) -> Calibration:
    """Scales from the probes' KL over the all-Q8_0 baseline (see the module doc)."""
    scales: dict[str, float] = {}
    for group, probe in sorted(probes.items()):
        extra_error = probe["error_sum"] - baseline["error_sums"][group]
        extra_kl = probe["kl"] - baseline["kl"]
        scales[group] = extra_kl / extra_error if extra_error > 0 and extra_kl > 0 else 0.0
    positive = sorted(v for v in scales.values() if v > 0)
    floor = (positive[len(positive) // 2] if positive else 1.0) * MIN_SCALE_SHARE
    for group in scales:
        if scales[group] <= 0:
            log.info(
                "calibration: probe %s moved KL by %.2e; its scale is set to %.3g",
                group,
                probes[group]["kl"] - baseline["kl"],
                floor,
            )
            scales[group] = floor
    explained = sum(scales[g] * baseline["error_sums"].get(g, 0.0) for g in scales)
    return Calibration(scales, {"q8_0": baseline, **probes}, max(0.0, baseline["kl"] - explained))
