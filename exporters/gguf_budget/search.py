"""The budgeted GGUF: measure, calibrate, allocate, make, verify.

    search = BudgetSearch(intermediate, imatrix, calib_text, work, settings)
    mixes = search.run([parse_target("like:Q4_K_M"), parse_target("2.5GB")])

1. sensitivity: every candidate type of every tensor, made by llama-quantize and measured (sensitivity.py);
2. calibration: KL of the all-Q8_0 mix, of one probe per tensor group, of one per depth band and of the low
   probe (sensitivity round 1), against the f16 logits on the calibration text (calibrate.py);
3. per target: the byte budget (a named mix's real size for like:TYPE), then one allocation (allocate.py) per
   step of the factor on the types under the probes' bits (BELOW_STEPS), each made by llama-quantize with one
   --tensor-type override per tensor, its real size checked against the prediction and its KL measured on
   more of the calibration text than the probes (`verify_chunks`); the one that measures least is the mix.
   The named mix nearest in size (at or under the budget) is made and measured the same way, so the report
   can say which is better.

Why measured steps rather than the fitted factor alone: the fit is linear in each tensor's error, and at a
budget's operating point it underrates the types under the probes' bits. On the demo model at Q4_K_M's size
(KL on eval.txt; Q4_K_M 0.0297): the fitted factor 1.23 gave 0.0223, 1.7 gave 0.0205, 2.2 gave 0.0203 and
3.0 gave 0.0206, and the calibration text ranked the four the same way. Per-group low probes (0.7-1.3 per
group) and one scale per role instead of per group both predicted lower and measured worse (0.0200 and 0.0214
on the calibration text, against 0.0203 for the fitted factor): the error is in the linear model, not in its
resolution, so the search measures a few steps instead of trusting one.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from exporters.gguf_budget import allocate as alloc
from exporters.gguf_budget import calibrate, sensitivity
from exporters.gguf_budget.slots import DEFAULT_CANDIDATES, SizeModel, Slot, candidate_slots, quant_sizes, size_model
from exporters.gguf_budget.target import Target, option_name
from exporters.gguf_inspect import read_gguf
from exporters.llamacpp.build import tool_command
from exporters.llamacpp.run import run_tool
from mergeq.core.errors import MergeqError

log = logging.getLogger(__name__)

# Named mixes a budgeted one is compared with (the nearest in size at or under its budget).
NAMED_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
_DRY_SIZE = re.compile(r"quant size\s*=\s*([0-9.]+) MiB")
# multipliers of the fitted factor on the types under the probes' bits: one allocation each, the one that
# measures least is kept (see the module doc); 1.0 keeps the fitted model among the candidates
BELOW_STEPS = (1.0, 1.8, 2.6)


@dataclass(frozen=True)
class SearchSettings:
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    n_ctx: int = 512  # llama-perplexity context of the calibration KL
    # windows of the calibration text scored per probe: on the demo model 2 windows fit the scales within 4% of
    # what 4 gave, at half the cost of the dozen probes
    chunks: int = 2
    # windows scored per mix the search chooses between (and the named mix it is compared with): 2 windows
    # ranked two mixes 0.80x and 0.83x of Q4_K_M where 4 windows and eval.txt both gave 0.74x and 0.75x
    verify_chunks: int = 4
    depth_bands: int = 3  # depth bands of layers, one probe each (calibrate.band_of); 0: one scale per group
    threads: int | None = None


@dataclass
class Mix:
    """One budgeted file and everything its report says about it."""

    target: Target
    budget_bytes: int
    path: Path  # in the work directory until the exporter moves it
    types: dict[str, str]
    predicted_bytes: int
    predicted_kl: float
    measured: calibrate.Measured
    named: dict  # {"type", "bytes", "path", "kl", "top1", "ppl", "predicted_kl"}
    quantize_log: str = ""
    candidates: list[dict] = field(default_factory=list)  # every step's allocation: below, bytes, predicted, measured

    @property
    def beats_named(self) -> bool:
        return self.measured.kl <= self.named["kl"]

    def to_json(self) -> dict:
        return {
            "target": self.target.spec,
            "budget_bytes": self.budget_bytes,
            "predicted_bytes": self.predicted_bytes,
            "predicted_kl": self.predicted_kl,
            "measured": {"kl": self.measured.kl, "top1": self.measured.top1, "ppl": self.measured.ppl},
            "named_mix": {k: v for k, v in self.named.items() if k != "path"},
            "beats_named_mix": self.beats_named,
            "candidates": self.candidates,
            "tensor_types": dict(sorted(self.types.items())),
        }


@dataclass
class SearchState:
    slots: list[Slot]
    errors: dict[str, dict[str, float]]
    sizes: SizeModel
    calibration: calibrate.Calibration
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "calibration": self.calibration.to_json(),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "sensitivity": {n: {t: e for t, e in sorted(v.items())} for n, v in sorted(self.errors.items())},
        }


class BudgetSearch:
    def __init__(
        self, intermediate: Path, imatrix: Path, calib_text: Path, work: Path, settings: SearchSettings | None = None
    ):
        self.intermediate, self.imatrix, self.text = Path(intermediate), Path(imatrix), Path(calib_text)
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.settings = settings or SearchSettings()
        self.state: SearchState | None = None
        self._base: calibrate.KLBase | None = None  # the probes' f16 logits (`chunks` windows)
        self._verify: calibrate.KLBase | None = None  # the mixes' (`verify_chunks` windows)
        self._named: dict[str, dict] = {}

    # -- shared by every target

    def prepare(self, on_step=None) -> SearchState:
        s = self.settings
        seconds: dict[str, float] = {}
        summary = read_gguf(self.intermediate)
        slots = candidate_slots(summary, s.candidates)
        if not slots:
            raise MergeqError(
                f"{self.intermediate} has no tensor that any candidate type fits",
                hint=f"candidates: {', '.join(s.candidates)}",
            )
        bits = self._bits()
        low_types = calibrate.low_probe_types(slots, bits)
        rounds = sensitivity.rounds(slots, low_types)  # round 1 is the low probe: its KL is measured too
        started = time.perf_counter()
        self._base = calibrate.kl_base(
            self.intermediate, self.text, self.work / "kl-base.bin", s.n_ctx, s.chunks, s.threads
        )
        seconds["calibration"] = time.perf_counter() - started
        low_probe = None
        files, measured = [], {"errors": {}, "weighted": {}}
        seconds["quantize_rounds"] = seconds["error_pass"] = 0.0
        # the slots a round does not measure are copied as they are (making them Q8_0 again in every round cost
        # 1.5 s of CPU per round on the demo model, half of what a round of Q5_0 costs)
        as_is = {t.name: t.type for t in summary.tensors if t.name in {x.name for x in slots}}
        for r, types in enumerate(rounds):  # one round file on disk at a time (round 0 is kept: the Q8_0 baseline)
            out = self.work / f"round-{r:02d}.gguf"
            started = time.perf_counter()
            sensitivity.quantize_mix(self.intermediate, out, {**as_is, **types}, self.imatrix, s.threads)
            seconds["quantize_rounds"] += time.perf_counter() - started
            started = time.perf_counter()
            found = sensitivity.errors_of(self.intermediate, self.imatrix, [out], sorted(types))
            seconds["error_pass"] += time.perf_counter() - started
            for name, by_type in found["errors"].items():
                measured["errors"].setdefault(name, {}).update(by_type)
            measured["weighted"].update(found["weighted"])
            files.append(out)
            if r == 1:
                started = time.perf_counter()
                result = calibrate.measure_kl(out, self._base, s.threads)
                low_probe = {"kl": result.kl, "top1": result.top1, "types": types}
                seconds["calibration"] += time.perf_counter() - started
            if r:
                out.unlink()
            if on_step:
                on_step(f"sensitivity round {r + 1}/{len(rounds)}")
        errors = {n: {t: e for t, e in v.items() if t in s.candidates} for n, v in measured["errors"].items()}
        kept = [x.name for x in slots if not errors.get(x.name)]
        if kept:
            log.info("llama-quantize keeps %d tensor(s) as they are: %s", len(kept), ", ".join(kept[:8]))
        slots = [
            Slot(x.name, x.shape, tuple(t for t in x.candidates if t in errors.get(x.name, {})))
            for x in slots
            if errors.get(x.name)
        ]
        sizes = size_model(summary, slots)
        # the header of a llama-quantize output differs from the intermediate's (imatrix keys, version):
        # take the fixed bytes from a real output, round 0, whose types are known
        round0 = read_gguf(files[0])
        r0_types = {t.name: t.type for t in round0.tensors}
        sizes = SizeModel(
            round0.size_bytes - sum(sizes.slot_bytes(x, r0_types[x.name]) for x in slots), sizes.alignment, sizes.sizes
        )
        # calibration: the all-highest mix is round 0 (every tensor's first candidate)
        started = time.perf_counter()
        groups = sorted({calibrate.group_of(x) for x in slots})
        layers = [x.layer for x in slots if x.layer is not None]
        n_layers = max(layers) + 1 if layers else 0
        bands = min(s.depth_bands, n_layers)
        top = calibrate.highest_types(slots, errors, bits)
        if any(r0_types[n] != t for n, t in top.items()):
            sensitivity.quantize_mix(self.intermediate, files[0], top, self.imatrix, s.threads)
        base = calibrate.measure_kl(files[0], self._base, s.threads)
        files[0].unlink(missing_ok=True)
        baseline = {
            "kl": base.kl,
            "top1": base.top1,
            "table": calibrate.error_table(slots, errors, top, n_layers, bands),
        }
        if on_step:
            on_step("calibration: all-Q8_0 mix")
        lowered = {group: group for group in groups}
        lowered.update({f"band {b}": (lambda x, b=b: calibrate.band_of(x, n_layers, bands) == b) for b in range(bands)})
        probes = {}
        for name, pick in lowered.items():
            types = calibrate.probe_types(slots, errors, bits, pick)
            out = self.work / f"probe-{name.replace(' ', '-')}.gguf"
            sensitivity.quantize_mix(self.intermediate, out, types, self.imatrix, s.threads)
            result = calibrate.measure_kl(out, self._base, s.threads)
            out.unlink(missing_ok=True)
            probes[name] = {
                "kl": result.kl,
                "top1": result.top1,
                "table": calibrate.error_table(slots, errors, types, n_layers, bands),
                "types": sorted({types[x.name] for x in slots if types[x.name] != top[x.name]}),
            }
            if on_step:
                on_step(f"calibration: probe {name}")
        band_probes = {b: probes.pop(f"band {b}") for b in range(bands)}
        calibration = calibrate.fit(slots, errors, baseline, probes, band_probes, n_layers, low_probe, bits)
        seconds["calibration"] += time.perf_counter() - started
        self.state = SearchState(slots, errors, sizes, calibration, seconds)
        return self.state

    def _verify_base(self) -> calibrate.KLBase:
        """The f16 logits of `verify_chunks` windows, made once, when the first mix is measured."""
        if self._verify is None:
            s = self.settings
            started = time.perf_counter()
            self._verify = calibrate.kl_base(
                self.intermediate, self.text, self.work / "kl-verify.bin", s.n_ctx, s.verify_chunks, s.threads
            )
            if self.state is not None:
                self.state.seconds["verification"] = time.perf_counter() - started
        return self._verify

    def _bits(self) -> dict[str, float]:
        return {t: 8 * size / block for t, (block, size) in quant_sizes().items()}

    # -- one target

    def budget_bytes(self, target: Target, parameters: int) -> int:
        if target.kind == "size":
            return int(target.value)
        if target.kind == "bpw":
            return int(float(target.value) * parameters / 8)
        return self.named_mix(str(target.value))["bytes"]

    def check_targets(self, targets: list[Target], parameters: int) -> None:
        """Before any work: a size or bpw target below the smallest file the candidates reach is refused (the
        header of a quantized file differs from the intermediate's by a few hundred bytes: 64 KiB of slack)."""
        summary = read_gguf(self.intermediate)
        slots = candidate_slots(summary, self.settings.candidates)
        sizes = size_model(summary, slots)
        floor = sizes.fixed_bytes - (64 << 10) + sum(min(sizes.slot_bytes(x, t) for t in x.candidates) for x in slots)
        for target in targets:
            if target.kind != "like":
                what = f"{option_name(target)} {target.spec}"
                alloc.check_feasible(floor, self.budget_bytes(target, parameters), what)

    def named_mix(self, qtype: str) -> dict:
        """A named llama-quantize mix made with the same imatrix, its size and its KL (made once)."""
        if qtype not in self._named:
            out = self.work / f"named-{qtype}.gguf"
            result = sensitivity.quantize(
                self.intermediate,
                out,
                qtype,
                self.imatrix,
                self.settings.threads,
                hint=f"llama-quantize could not make {qtype}",
            )
            measured = calibrate.measure_kl(out, self._verify_base(), self.settings.threads)
            types = {t.name: t.type for t in read_gguf(out).tensors}
            state = self.state
            predicted = None
            if all(types.get(x.name) in state.errors[x.name] for x in state.slots):
                predicted = state.calibration.predict(state.slots, state.errors, types)
            self._named[qtype] = {
                "type": qtype,
                "bytes": out.stat().st_size,
                "path": out,
                "kl": measured.kl,
                "top1": measured.top1,
                "ppl": measured.ppl,
                "predicted_kl": predicted,
                "log": result.stdout + result.stderr,
            }
        return self._named[qtype]

    def nearest_named(self, budget: int) -> str:
        """The largest named mix whose dry-run size fits the budget (the smallest one if none does)."""
        sized = []
        fixed_extra = self.state.sizes.fixed_bytes
        for qtype in NAMED_MIXES:
            result = run_tool(
                tool_command(
                    "llama-quantize",
                    "--dry-run",
                    "--imatrix",
                    self.imatrix,
                    self.intermediate,
                    self.work / "dry-run.gguf",
                    qtype,
                )
            )
            found = _DRY_SIZE.findall(result.stdout + result.stderr)
            if found:
                sized.append((int(float(found[-1]) * 2**20) + fixed_extra, qtype))
        fitting = [s for s in sized if s[0] <= budget]
        return (max(fitting) if fitting else min(sized))[1]

    def dominant_type(self, types: dict[str, str]) -> str:
        """The type that holds the most bytes of the mix: the file type llama-quantize is given (with one
        override per tensor it only names the file, general.file_type), so a reader sees the mix's main type."""
        state = self.state
        held: dict[str, int] = {}
        for slot in state.slots:
            held[types[slot.name]] = held.get(types[slot.name], 0) + state.sizes.slot_bytes(slot, types[slot.name])
        return max(sorted(held), key=lambda t: held[t]) if held else "Q8_0"

    def _made(self, label: str, types: dict[str, str]):
        """`types` written by llama-quantize into WORK/label.gguf, every override checked in the file."""
        out = self.work / f"{label}.gguf"
        result = sensitivity.quantize_mix(
            self.intermediate, out, types, self.imatrix, self.settings.threads, base_type=self.dominant_type(types)
        )
        written = {t.name: t.type for t in read_gguf(out).tensors}
        wrong = {n: (t, written.get(n)) for n, t in types.items() if written.get(n) != t}
        if wrong:
            raise MergeqError(
                f"llama-quantize did not apply {len(wrong)} of the budget's tensor types to {out.name}, "
                f"e.g. {next(iter(wrong))}: {next(iter(wrong.values()))}",
                hint="the pinned llama-quantize's --tensor-type-file handling changed; report this",
            )
        return out, result.stdout + result.stderr

    def make(self, target: Target, parameters: int) -> Mix:
        state = self.state or self.prepare()
        budget = self.budget_bytes(target, parameters)
        what = f"{option_name(target)} {target.spec}"
        calibration = state.calibration
        started = time.perf_counter()
        candidates: list[dict] = []
        best = None  # (step index, path, allocation, measured, log); only the best file is kept
        for step in BELOW_STEPS:
            below = calibration.below * step
            choices = {
                x.name: [
                    alloc.Option(
                        t, state.sizes.slot_bytes(x, t), calibration.cost(x, t, state.errors[x.name][t], below)
                    )
                    for t in x.candidates
                ]
                for x in state.slots
            }
            allocation = alloc.allocate(choices, state.sizes.fixed_bytes, budget, what=what)
            entry = {
                "below": below,
                "bytes": allocation.nbytes,
                "predicted_kl": calibration.predict(state.slots, state.errors, allocation.types, below),
            }
            same = next((c for c in candidates if c.get("types") == allocation.types), None)
            if same is not None:  # a step that changes no tensor's type is not made again
                entry["measured_kl"], entry["same_as_below"] = same["measured_kl"], same["below"]
                candidates.append({**entry, "types": allocation.types})
                continue
            out, quantize_log = self._made(f"{target.label}-step{len(candidates)}", allocation.types)
            if out.stat().st_size != allocation.nbytes:
                log.warning("%s: %d bytes, predicted %d", out.name, out.stat().st_size, allocation.nbytes)
            measured = calibrate.measure_kl(out, self._verify_base(), self.settings.threads)
            entry["measured_kl"] = measured.kl
            candidates.append({**entry, "types": allocation.types})
            if best is None or measured.kl < best[3].kl:
                if best is not None:
                    best[1].unlink(missing_ok=True)
                best = (len(candidates) - 1, out, allocation, measured, quantize_log)
            else:
                out.unlink(missing_ok=True)
        chosen, path, allocation, measured, quantize_log = best
        kept = candidates[chosen]
        final = self.work / f"{target.label}.gguf"
        path.replace(final)
        for i, c in enumerate(candidates):
            c.pop("types")
            c["chosen"] = i == chosen
        state.seconds[f"mix {target.label}"] = time.perf_counter() - started
        log.info(
            "%s: %d allocations measured, KL %s; kept the one at factor %.3g",
            target.label,
            len(candidates),
            ", ".join(f"{c['measured_kl']:.5f}" for c in candidates),
            kept["below"],
        )
        named = self.named_mix(str(target.value) if target.kind == "like" else self.nearest_named(budget))
        return Mix(
            target,
            budget,
            final,
            allocation.types,
            allocation.nbytes,
            kept["predicted_kl"],
            measured,
            {k: v for k, v in named.items() if k != "log"},
            quantize_log,
            candidates,
        )
