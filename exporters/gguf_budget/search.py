"""The budgeted GGUF: measure, calibrate, allocate, make, verify.

    search = BudgetSearch(intermediate, imatrix, calib_text, work, settings)
    mixes = search.run([parse_target("like:Q4_K_M"), parse_target("2.5GB")])

1. sensitivity: every candidate type of every tensor, made by llama-quantize and measured (sensitivity.py);
2. calibration: KL of the all-Q8_0 mix, of one probe per tensor group, of one per depth band and of the low
   probe (sensitivity round 1), against the f16 logits on the calibration text (calibrate.py);
3. per target: the byte budget (a named mix's real size for like:TYPE), the allocation (allocate.py), the
   file made by llama-quantize with one --tensor-type override per tensor, its real size checked against
   the prediction, its KL measured the same way, and the named mix nearest in size (at or under the
   budget) made and measured too, so the report can say which is better.
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


@dataclass(frozen=True)
class SearchSettings:
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    n_ctx: int = 512  # llama-perplexity context of the calibration KL
    chunks: int = 4  # windows of the calibration text scored per KL measurement
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
        self._base: calibrate.KLBase | None = None
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
        top = {x.name: max(errors[x.name], key=lambda t: (bits[t], -errors[x.name][t], t)) for x in slots}
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
            measured = calibrate.measure_kl(out, self._base, self.settings.threads)
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

    def make(self, target: Target, parameters: int) -> Mix:
        state = self.state or self.prepare()
        budget = self.budget_bytes(target, parameters)
        what = option_name(target)
        choices = {
            x.name: [
                alloc.Option(
                    t,
                    state.sizes.slot_bytes(x, t),
                    state.calibration.cost(x, t, state.errors[x.name][t]),
                )
                for t in x.candidates
            ]
            for x in state.slots
        }
        allocation = alloc.allocate(choices, state.sizes.fixed_bytes, budget, what=f"{what} {target.spec}")
        out = self.work / f"{target.label}.gguf"
        result = sensitivity.quantize_mix(
            self.intermediate,
            out,
            allocation.types,
            self.imatrix,
            self.settings.threads,
            base_type=self.dominant_type(allocation.types),
        )
        written = {t.name: t.type for t in read_gguf(out).tensors}
        wrong = {n: (t, written.get(n)) for n, t in allocation.types.items() if written.get(n) != t}
        if wrong:
            raise MergeqError(
                f"llama-quantize did not apply {len(wrong)} of the budget's tensor types to {out.name}, "
                f"e.g. {next(iter(wrong))}: {next(iter(wrong.values()))}",
                hint="the pinned llama-quantize's --tensor-type-file handling changed; report this",
            )
        measured = calibrate.measure_kl(out, self._base, self.settings.threads)
        named = self.named_mix(str(target.value) if target.kind == "like" else self.nearest_named(budget))
        if out.stat().st_size != allocation.nbytes:
            log.warning("%s: %d bytes, predicted %d", out.name, out.stat().st_size, allocation.nbytes)
        return Mix(
            target,
            budget,
            out,
            allocation.types,
            allocation.nbytes,
            state.calibration.predict(state.slots, state.errors, allocation.types),
            measured,
            {k: v for k, v in named.items() if k != "log"},
            result.stdout + result.stderr,
        )
