"""The budget allocator and the target parser, on plain data (no llama.cpp needed)."""

from __future__ import annotations

import itertools
import random

import pytest

from exporters.gguf_budget.allocate import Option, allocate, smallest_bytes
from exporters.gguf_budget.target import parse_target
from mergeq.core.errors import MergeqError

TYPES = (("Q8_0", 8.5, 1.0), ("Q5_0", 5.5, 12.0), ("IQ4_NL", 4.5, 30.0), ("Q4_0", 4.5, 40.0), ("Q2_K", 2.625, 400.0))


def choices(n: int, seed: int = 0) -> dict[str, list[Option]]:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        elems = rng.choice((4096, 8192, 16384))
        weight = rng.uniform(0.2, 5.0)
        out[f"blk.{i}.w"] = [
            Option(t, int(elems * bits / 8), weight * err * rng.uniform(0.8, 1.2)) for t, bits, err in TYPES
        ]
    return out


def brute_force(ch: dict[str, list[Option]], fixed: int, budget: int) -> float:
    best = float("inf")
    names = sorted(ch)
    for combo in itertools.product(*(ch[n] for n in names)):
        if fixed + sum(o.nbytes for o in combo) <= budget:
            best = min(best, sum(o.cost for o in combo))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_respects_the_budget_and_is_the_optimum(seed):
    ch = choices(5, seed)
    fixed = 1000
    low, high = smallest_bytes(ch, fixed), fixed + sum(max(o.nbytes for o in opts) for opts in ch.values())
    for budget in (low, (2 * low + high) // 3, (low + high) // 2, high):
        result = allocate(ch, fixed, budget)
        assert result.nbytes <= budget
        chosen = [next(o.nbytes for o in ch[n] if o.qtype == t) for n, t in result.types.items()]
        assert result.nbytes == fixed + sum(chosen)
        optimum = brute_force(ch, fixed, budget)
        assert result.cost == pytest.approx(optimum, rel=1e-12), (budget, result.cost, optimum)


def test_a_large_tensor_gets_the_upgrade_a_hull_greedy_misses():
    """Budget for either the big tensor's upgrade or the small one's: the big one saves more in all, though less
    per byte (a greedy by saving per byte takes the small one first and then cannot afford the big one)."""
    ch = {
        "big": [Option("IQ4_NL", 1000, 10.0), Option("Q8_0", 2000, 0.0)],
        "small": [Option("IQ4_NL", 100, 2.0), Option("Q8_0", 200, 0.0)],
    }
    result = allocate(ch, 0, 2100)
    assert result.types == {"big": "Q8_0", "small": "IQ4_NL"} and result.cost == 2.0


def test_more_budget_never_predicts_more_divergence():
    ch = choices(40, 3)
    low = smallest_bytes(ch, 0)
    costs = [allocate(ch, 0, int(low * f)).cost for f in (1.0, 1.2, 1.5, 2.0, 4.0)]
    assert costs == sorted(costs, reverse=True)
    assert costs[-1] == pytest.approx(sum(min(o.cost for o in opts) for opts in ch.values()))


def test_same_inputs_same_mix():
    ch = choices(60, 7)
    budget = int(smallest_bytes(ch, 0) * 1.4)
    first = allocate(ch, 0, budget)
    assert all(allocate(dict(reversed(list(ch.items()))), 0, budget).types == first.types for _ in range(3))


def test_impossible_budget_names_the_option_and_the_smallest_size():
    ch = choices(10, 1)
    floor = smallest_bytes(ch, 500)
    with pytest.raises(MergeqError) as err:
        allocate(ch, 500, floor - 1, what="--target-size 1KB")
    assert "--target-size 1KB" in str(err.value) and f"{floor:,}" in str(err.value)
    assert allocate(ch, 500, floor).nbytes == floor


@pytest.mark.parametrize(
    "spec, kind, value",
    [
        ("2.5GB", "size", 2_500_000_000),
        ("700MiB", "size", 700 * 2**20),
        ("123B", "size", 123),
        ("4.5bpw", "bpw", 4.5),
        ("like:q4_k_m", "like", "Q4_K_M"),
        ("1e3", None, None),
        ("3 parsecs", None, None),
        ("like:Q9_X", None, None),
        ("40bpw", None, None),
    ],
)
def test_target_specs(spec, kind, value):
    if kind is None:
        with pytest.raises(MergeqError) as err:
            parse_target(spec, "--target", known_types=("Q4_K_M", "Q3_K_M"))
        assert "--target" in str(err.value)
    else:
        target = parse_target(spec, "--target", known_types=("Q4_K_M", "Q3_K_M"))
        assert (target.kind, target.value) == (kind, value)


def _calibration_case(depth_truth: dict[int, float], bands: int):
    """A 4-layer toy whose KL is exactly floor + sum of scale[group] * depth[band] * error, with its probes."""
    from exporters.gguf_budget.calibrate import band_of, error_table, group_of
    from exporters.gguf_budget.slots import Slot

    truth, floor = {"attn_qk": 0.5, "ffn_down": 2.0, "token_embd": 9.0}, 0.003
    slots = [Slot("token_embd.weight", (64, 320), ("Q8_0", "IQ4_NL"))]
    for layer in range(4):
        slots += [
            Slot(f"blk.{layer}.attn_q.weight", (64, 64), ("Q8_0", "IQ4_NL")),
            Slot(f"blk.{layer}.attn_k.weight", (64, 16), ("Q8_0", "IQ4_NL")),
            Slot(f"blk.{layer}.ffn_down.weight", (256, 64), ("Q8_0", "Q4_K")),
        ]
    errors = {s.name: {"Q8_0": 1e-5 * (i % 5 + 1), s.candidates[1]: 1e-2 * (i % 7 + 1)} for i, s in enumerate(slots)}

    def weight(s):
        band = band_of(s, 4, bands)
        return truth[group_of(s)] * (1.0 if band is None else depth_truth.get(band, 1.0))

    def kl(types):
        return floor + sum(weight(s) * errors[s.name][types[s.name]] for s in slots)

    def measured(pick):
        types = {s.name: s.candidates[1] if pick(s) else "Q8_0" for s in slots}
        return {"kl": kl(types), "table": error_table(slots, errors, types, 4, bands)}

    baseline = measured(lambda s: False)
    probes = {g: measured(lambda s, g=g: group_of(s) == g) for g in truth}
    band_probes = {b: measured(lambda s, b=b: band_of(s, 4, bands) == b) for b in range(bands)}
    return slots, errors, truth, floor, baseline, probes, band_probes, kl


def test_calibration_recovers_group_scales_and_the_floor():
    """KL = floor + sum of scale[group] * error: the probes over the all-Q8_0 mix give back scales and floor."""
    from exporters.gguf_budget.calibrate import fit

    slots, errors, truth, floor, baseline, probes, _, kl = _calibration_case({}, 0)
    calibration = fit(slots, errors, baseline, probes)
    assert calibration.scales == pytest.approx(truth)
    assert calibration.intercept == pytest.approx(floor)
    mixed = {s.name: s.candidates[i % 2] for i, s in enumerate(slots)}
    assert calibration.predict(slots, errors, mixed) == pytest.approx(kl(mixed))


def test_calibration_recovers_depth_bands():
    """With a deeper band three times as sensitive, the group and band probes together give back the product
    scale[group] * depth[band] of every tensor, and so the KL of any mix."""
    from exporters.gguf_budget.calibrate import fit

    slots, errors, truth, floor, baseline, probes, band_probes, kl = _calibration_case({0: 1.0, 1: 3.0}, 2)
    calibration = fit(slots, errors, baseline, probes, band_probes, n_layers=4)
    ratio = calibration.depth[1] / calibration.depth[0]
    assert ratio == pytest.approx(3.0, rel=1e-3)
    assert calibration.scales["token_embd"] == pytest.approx(truth["token_embd"])
    assert calibration.intercept == pytest.approx(floor, abs=1e-6)
    for k in range(3):
        mixed = {s.name: s.candidates[(i + k) % 2] for i, s in enumerate(slots)}
        assert calibration.predict(slots, errors, mixed) == pytest.approx(kl(mixed), rel=1e-3)
    # without the band probes the same groups average over depth, and the deep band's tensors are underrated
    flat = fit(slots, errors, baseline, probes)
    deep = [s for s in slots if s.layer is not None and s.layer >= 2]
    assert all(flat.weight(s) < calibration.weight(s) for s in deep)


def test_targets_from_the_command_line_and_the_pipeline_table(tmp_path):
    import argparse

    from exporters.gguf import GGUFOptions
    from mergeq.core.options import add_options, from_namespace, from_table

    calib = tmp_path / "calib.txt"
    calib.write_text("text")
    parser = argparse.ArgumentParser()
    add_options(parser, GGUFOptions)
    args = parser.parse_args(
        ["--imatrix", "--calib", str(calib), "--target", "like:q4_k_m", "--target-size", "2.5GB", "--target-bpw", "4.5"]
    )
    assert from_namespace(GGUFOptions, args).targets == ("like:q4_k_m", "2.5GB", "4.5bpw")
    with pytest.raises(MergeqError) as err:
        from_namespace(GGUFOptions, parser.parse_args(["--target-size", "2.5GB"]))
    assert "--target-size 2.5GB needs an importance matrix" in str(err.value)

    problems = []
    table = {"imatrix": True, "calib": str(calib), "target": ["like:Q4_K_M", "2.5GB"]}
    options = from_table(GGUFOptions, table, problem=lambda key, message: problems.append((key, message)))
    assert problems == [] and options.targets == ("like:Q4_K_M", "2.5GB")
    from_table(GGUFOptions, {"target": ["like:Q9_Z"]}, problem=lambda key, message: problems.append((key, message)))
    assert problems and problems[0][0] == "target" and "Q9_Z" in problems[0][1]


def test_low_probe_fits_the_factor_for_types_under_the_probes_bits():
    """Probes at Q5_0 fit the scales; the low probe (IQ4_NL, the embedding kept at Q8_0) fits how much more an
    IQ4_NL error weighs than its size says, and then mixes of all three types are predicted."""
    from exporters.gguf_budget.calibrate import error_table, fit, group_of, low_probe_types
    from exporters.gguf_budget.slots import Slot

    bits = {"Q8_0": 8.5, "Q5_0": 5.5, "IQ4_NL": 4.5}
    truth, floor, factor = {"attn_qk": 0.5, "ffn_in": 2.0, "token_embd": 9.0}, 0.003, 1.7
    slots = [Slot("token_embd.weight", (64, 320), ("Q8_0", "Q5_0", "IQ4_NL"))]
    for layer in range(2):
        for role in ("attn_q", "attn_k", "ffn_up"):
            slots.append(Slot(f"blk.{layer}.{role}.weight", (64, 64), ("Q8_0", "Q5_0", "IQ4_NL")))
    errors = {s.name: {"Q8_0": 1e-5, "Q5_0": 1e-3 * (i + 1), "IQ4_NL": 3e-3 * (i + 2)} for i, s in enumerate(slots)}

    def kl(types):
        return floor + sum(
            truth[group_of(s)] * errors[s.name][types[s.name]] * (factor if types[s.name] == "IQ4_NL" else 1.0)
            for s in slots
        )

    def measured(types):
        return {"kl": kl(types), "table": error_table(slots, errors, types, 2, 0)}

    top = {s.name: "Q8_0" for s in slots}
    probes = {g: measured({s.name: "Q5_0" if group_of(s) == g else "Q8_0" for s in slots}) for g in truth}
    low = low_probe_types(slots, bits)
    assert low["token_embd.weight"] == "Q8_0" and {low[s.name] for s in slots if s.layer is not None} == {"IQ4_NL"}
    low_probe = {"kl": kl(low), "types": low}
    calibration = fit(slots, errors, measured(top), probes, None, 2, low_probe, bits)
    assert calibration.below == pytest.approx(factor)
    mixed = {s.name: s.candidates[i % 3] for i, s in enumerate(slots)}
    assert calibration.predict(slots, errors, mixed) == pytest.approx(kl(mixed))
    assert fit(slots, errors, measured(top), probes).predict(slots, errors, mixed) < kl(mixed)


def test_sensitivity_rounds_make_every_type_once_with_the_low_probe_second():
    from exporters.gguf_budget.sensitivity import rounds
    from exporters.gguf_budget.slots import Slot

    slots = [Slot("a", (32, 4), ("Q8_0", "Q5_0", "IQ4_NL")), Slot("b", (256, 4), ("Q8_0", "Q6_K", "Q4_K", "Q2_K"))]
    made = rounds(slots, {"a": "IQ4_NL", "b": "Q4_K"})
    assert made[0] == {"a": "Q8_0", "b": "Q8_0"} and made[1] == {"a": "IQ4_NL", "b": "Q4_K"}
    pairs = sorted((n, t) for r in made for n, t in r.items())
    assert pairs == sorted((s.name, t) for s in slots for t in s.candidates)
