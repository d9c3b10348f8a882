"""From measured errors to predicted KL: scales fitted on the real KL of a few whole-model mixes.

The relative error of a tensor says how much its output moves, not how much the model's next-token
distribution moves: that depends on what the tensor is (a query projection feeds a softmax, a down
projection the residual stream, the embedding every position) and on how deep it sits. So tensors are
grouped by role, and the layers into contiguous depth bands, and the search measures one probe mix per group
and one per band: every tensor at Q8_0 except the group's (or the band's), which take a low type. With

    KL(mix) ~ intercept + sum over tensors of scale[group] * depth[band] * error(tensor, type)

each probe's KL over the all-Q8_0 mix's is linear in the scales of one side given the other's, so the two
sets are fitted in turn until they settle (a rank-one fit of the group x band table; with no band probes,
depth is 1 everywhere and scale[g] is probe g's extra KL over its extra error). Tensors outside the layers
(the token embedding) have depth 1. The intercept is the all-Q8_0 mix's KL beyond what its own errors
predict.

Those probes lower tensors to 5.5-bit types; lower types move KL more than their error says in proportion:
on the demo model, IQ4_NL on every attn_q and ffn_gate (the rest Q5_0) measured twice the KL increase that
the linear fit predicted. So one more probe, every layer tensor at its lowest type of at least 4 bits (the
token embedding at Q8_0), fits one factor, `below`, for every type under the probes' bits. With it the fit
predicted the KL of the mixes chosen with and without it within 10% (without: up to 30% too low, and the
allocator had chosen exactly the IQ4_NL tensors it underrated).

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
from exporters.llamacpp.run import EVAL_WEIGHT_FLAGS, run_tool

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
# a probe gives its tensors the smallest candidate of at least this many bits per weight: Q5_0 or Q5_K, which
# llama-quantize makes 5-8 times faster than IQ4_NL (the search makes a dozen probes), near the types that
# budgets around Q4_K_M's size choose
PROBE_BITS = 5.5
LOW_PROBE_BITS = 4.0  # the low probe: each layer tensor's smallest type of at least this many bits
BELOW_RANGE = (0.25, 4.0)  # the factor for types under PROBE_BITS is kept in this range (one probe fits it)
EMBEDDINGS = ("token_embd", "output")  # groups the low probe leaves at their highest type
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
    # the weights used in place from the mapped file, as the evaluation uses them: no repacked copy of each
    # candidate in the tool's own memory (a Q8_0-sized copy of a 70B model), and the same sums whatever the limit
    return flags + list(EVAL_WEIGHT_FLAGS) + (["-t", str(threads)] if threads else [])


# the pinned llama-perplexity prints no KL statistics over fewer scored tokens than this (`kld.count < 100` in
# tools/perplexity/perplexity.cpp); each window scores its second half but the last token
MIN_SCORED_TOKENS = 100


def windows_for(n_ctx: int, chunks: int) -> int:
    """`chunks`, or more where that many windows of `n_ctx` tokens score fewer than MIN_SCORED_TOKENS."""
    scored = max(1, n_ctx - 1 - n_ctx // 2)
    return max(chunks, -(-MIN_SCORED_TOKENS // scored))


def kl_base(intermediate: Path, text: Path, out: Path, n_ctx: int, chunks: int, threads: int | None) -> KLBase:
    chunks = windows_for(n_ctx, chunks)
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


def band_of(slot: Slot, n_layers: int, bands: int) -> int | None:
    """The depth band of a layer's tensor; None for a tensor outside the layers. The first and the last layer
    are bands of their own (on the demo model, lowering the last layer alone moved KL five times as much as its
    errors predicted with one scale per group, the first 1.5 times, the others 0.5-0.95 times); the layers
    between split into bands - 2 contiguous runs of near-equal length. Fewer than 3 bands split evenly."""
    if slot.layer is None or bands <= 0 or n_layers <= 0:
        return None
    if bands < 3 or n_layers < bands:
        return min(bands - 1, slot.layer * bands // n_layers)
    if slot.layer == 0:
        return 0
    if slot.layer >= n_layers - 1:
        return bands - 1
    return 1 + (slot.layer - 1) * (bands - 2) // (n_layers - 2)


def probe_types(
    slots: list[Slot], errors: dict[str, dict[str, float]], bits: dict[str, float], lowered
) -> dict[str, str]:
    """All slots at their highest-bit type (Q8_0 by default) except those `lowered(slot)` picks, at their probe
    type. `lowered` may also be a group name: that group's slots."""
    pick = (lambda s, g=lowered: group_of(s) == g) if isinstance(lowered, str) else lowered
    types = {}
    for slot in slots:
        options = errors[slot.name]
        if pick(slot):
            low = [t for t in options if bits[t] >= PROBE_BITS] or list(options)
            types[slot.name] = min(low, key=lambda t: (bits[t], options[t], t))
        else:
            types[slot.name] = highest_type(options, bits)
    return types


def highest_type(options: dict[str, float], bits: dict[str, float]) -> str:
    """Of a tensor's measured types (type -> relative error), the one with most bits (least error, then name,
    among equals): what the all-Q8_0 baseline gives it."""
    return max(options, key=lambda t: (bits[t], -options[t], t))


def highest_types(slots: list[Slot], errors: dict[str, dict[str, float]], bits: dict[str, float]) -> dict[str, str]:
    """Every slot at its highest_type: the all-Q8_0 baseline mix."""
    return {x.name: highest_type(errors[x.name], bits) for x in slots}


def low_probe_types(slots: list[Slot], bits: dict[str, float]) -> dict[str, str]:
    """The low probe, chosen before any error is known (it is a sensitivity round too): every layer tensor at
    its fewest-bit type of at least LOW_PROBE_BITS (the first in candidate order among equals), the
    embeddings at their first candidate."""
    types = {}
    for slot in slots:
        low = [t for t in slot.candidates if bits[t] >= LOW_PROBE_BITS]
        if group_of(slot) in EMBEDDINGS or not low:
            types[slot.name] = slot.candidates[0]
        else:
            types[slot.name] = min(low, key=lambda t: (bits[t], slot.candidates.index(t)))
    return types


def error_table(
    slots: list[Slot], errors: dict[str, dict[str, float]], types: dict[str, str], n_layers: int, bands: int
) -> dict[str, dict[str, float]]:
    """group -> band (as a string, "-" outside the layers) -> summed error of `types` (JSON-ready)."""
    table: dict[str, dict[str, float]] = {}
    for s in slots:
        band = band_of(s, n_layers, bands)
        row = table.setdefault(group_of(s), {})
        key = "-" if band is None else str(band)
        row[key] = row.get(key, 0.0) + errors[s.name][types[s.name]]
    return table


@dataclass
class Calibration:
    scales: dict[str, float]  # group -> KL per unit of summed relative error (at depth 1)
    probes: dict[str, dict] = field(default_factory=dict)  # "q8_0", each group and "band N" -> its measurements
    # KL that no weight error explains: what the all-Q8_0 mix measures beyond its predicted part (llama.cpp also
    # quantizes the activations of a quantized matrix product, so any quantized mix has it)
    intercept: float = 0.0
    depth: dict[int, float] = field(default_factory=dict)  # band -> multiplier (1 where absent)
    n_layers: int = 0
    bands: int = 0
    below: float = 1.0  # factor on the error of a type under PROBE_BITS (fitted on the low probe)
    bits: dict[str, float] = field(default_factory=dict)  # type -> bits per weight (types under PROBE_BITS)

    def weight(self, slot: Slot) -> float:
        """KL per unit of this tensor's relative error."""
        band = band_of(slot, self.n_layers, self.bands)
        return self.scales[group_of(slot)] * (1.0 if band is None else self.depth.get(band, 1.0))

    def cost(self, slot: Slot, qtype: str, error: float, below: float | None = None) -> float:
        """The predicted KL that `slot` in `qtype`, with this relative error, adds (`below`: another factor for the
        types under PROBE_BITS than the fitted one)."""
        factor = (self.below if below is None else below) if self.bits.get(qtype, PROBE_BITS) < PROBE_BITS else 1.0
        return self.weight(slot) * error * factor

    def predict(
        self, slots: list[Slot], errors: dict[str, dict[str, float]], types: dict[str, str], below: float | None = None
    ) -> float:
        return self.intercept + sum(self.cost(s, types[s.name], errors[s.name][types[s.name]], below) for s in slots)

    def to_json(self) -> dict:
        return {
            "scales": self.scales,
            "depth": {str(b): m for b, m in sorted(self.depth.items())},
            "n_layers": self.n_layers,
            "bands": self.bands,
            "below": self.below,
            "intercept": self.intercept,
            "probes": self.probes,
        }


FIT_ROUNDS = 200  # alternations of the group and band fits (they settle within a few dozen on the demo model)


def fit(
    slots,
    errors,
    baseline: dict,
    probes: dict[str, dict],
    band_probes: dict[int, dict] | None = None,
    n_layers=0,
    low_probe: dict | None = None,
    bits: dict[str, float] | None = None,
) -> Calibration:
    """Scales (and depth multipliers, given band probes; the factor `below`, given the low probe) from the
    probes' KL over the all-Q8_0 baseline.

    baseline: {"kl", "table"}; probes: group -> {"kl", "table"}; band_probes: band -> {"kl", "table"}, each
    "table" that mix's error_table; low_probe: {"kl", "types"}; bits: type -> bits per weight. See the module
    doc."""
    band_probes = band_probes or {}
    bands = len(band_probes)
    base_table = baseline["table"]

    def extra(table: dict, group: str, band: str) -> float:
        return max(0.0, table.get(group, {}).get(band, 0.0) - base_table.get(group, {}).get(band, 0.0))

    def mult(depth: dict[int, float], band: str) -> float:
        return 1.0 if band == "-" else depth.get(int(band), 1.0)

    groups = sorted(probes)
    depth = {b: 1.0 for b in band_probes}
    scales = {g: 0.0 for g in groups}

    def fit_scales():
        for g in groups:
            table, moved = probes[g]["table"], probes[g]["kl"] - baseline["kl"]
            err = sum(mult(depth, b) * extra(table, g, b) for b in table.get(g, {}))
            scales[g] = moved / err if err > 0 and moved > 0 else 0.0

    for _ in range(FIT_ROUNDS if bands else 0):
        fit_scales()
        for b, probe in band_probes.items():
            moved = probe["kl"] - baseline["kl"]
            err = sum(scales[g] * extra(probe["table"], g, str(b)) for g in groups)
            depth[b] = moved / err if err > 0 and moved > 0 else 0.0
        _floor(depth, "band", band_probes, baseline)
        # scale[g] * depth[b] is all a fit fixes: keep the depths' mean at 1 so that neither side drifts
        mean = sum(depth.values()) / len(depth)
        depth.update({b: m / mean for b, m in depth.items()})
    fit_scales()
    _floor(scales, "probe", probes, baseline)
    calibration = Calibration(scales, {"q8_0": baseline, **probes}, 0.0, depth, n_layers, bands)
    calibration.probes.update({f"band {b}": p for b, p in band_probes.items()})
    explained = sum(
        scales[g] * mult(depth, b) * err for g, row in base_table.items() if g in scales for b, err in row.items()
    )
    calibration.intercept = max(0.0, baseline["kl"] - explained)
    if low_probe is not None and bits:
        calibration.bits = {t: b for t, b in bits.items() if b < PROBE_BITS}
        calibration.probes["low"] = {
            "kl": low_probe["kl"],
            "top1": low_probe.get("top1"),
            "types": sorted(set(low_probe["types"].values())),
        }
        top = highest_types(slots, errors, bits)
        lowered = [x for x in slots if low_probe["types"].get(x.name, top[x.name]) != top[x.name]]
        # KL(low) - KL(all-Q8_0) = below * (weighted errors under PROBE_BITS) + (weighted errors of the other
        # lowered tensors) - (the lowered tensors' weighted errors at their highest type)
        under, moved = 0.0, low_probe["kl"] - baseline["kl"]
        for x in lowered:
            qtype = low_probe["types"][x.name]
            w = calibration.weight(x)
            moved += w * errors[x.name][top[x.name]]
            if bits[qtype] < PROBE_BITS:
                under += w * errors[x.name][qtype]
            else:
                moved -= w * errors[x.name][qtype]
        if under > 0 and moved > 0:
            calibration.below = min(BELOW_RANGE[1], max(BELOW_RANGE[0], moved / under))
        log.info("calibration: types under %g bits weigh %.3g times their error", PROBE_BITS, calibration.below)
    return calibration


def _floor(values: dict, what: str, probes: dict, baseline: dict) -> None:
    """A probe that moved KL by (about) nothing gets MIN_SCALE_SHARE of the median positive value."""
    positive = sorted(v for v in values.values() if v > 0)
    floor = (positive[len(positive) // 2] if positive else 1.0) * MIN_SCALE_SHARE
    for key in values:
        if values[key] <= 0:
            log.info(
                "calibration: %s %s moved KL by %.2e; set to %.3g", what, key, probes[key]["kl"] - baseline["kl"], floor
            )
            values[key] = floor
