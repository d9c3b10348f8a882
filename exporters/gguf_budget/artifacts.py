"""The GGUF exporter's side of budgeted mixes: search, move each mix (and, when it loses, the named mix
nearest in size) into its own directory, and the report section that goes with it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from exporters.gguf_budget.search import BudgetSearch, Mix, SearchSettings
from exporters.gguf_budget.target import Target
from exporters.llamacpp.run import EVAL_WEIGHTS
from mergeq.core.atomic import atomic_dir

log = logging.getLogger(__name__)


@dataclass
class BudgetArtifact:
    label: str  # the report's `quant` and the directory name
    path: Path  # the final GGUF
    log: str  # llama-quantize's output
    extra: dict | None  # the report's extra["budget"] (None for a named mix written beside a losing one)
    warnings: list[str] = field(default_factory=list)


def make(
    intermediate: Path,
    imatrix: Path,
    calib: Path,
    targets: list[Target],
    work: Path,
    out_dir: Path,
    stem: str,
    parameters: int,
    *,
    requested: tuple[str, ...],
    settings: SearchSettings,
    on_step=None,
) -> tuple[list[BudgetArtifact], dict]:
    """Every target's mix in OUT/<label>/<stem>-<label>.gguf; the named mix nearest in size too where the
    mix measured worse (unless it is requested anyway). Returns the artifacts and the search's facts."""
    search = BudgetSearch(intermediate, imatrix, calib, work, settings)
    search.check_targets(targets, parameters)
    state = search.prepare(on_step=on_step)
    artifacts: list[BudgetArtifact] = []
    written_named: set[str] = set()
    for target in targets:
        mix = search.make(target, parameters)
        if on_step:
            on_step(f"mix {target.label}")
        warnings = []
        if not mix.beats_named:
            named = mix.named["type"]
            warnings.append(
                f"{target.label}: measured KL {mix.measured.kl:.5f} on the calibration text is worse than the named "
                f"mix nearest in size, {named} ({mix.named['kl']:.5f} at {mix.named['bytes']:,} bytes); "
                f"{named} is written too"
            )
            if named not in requested and named not in written_named:
                written_named.add(named)
                artifacts.append(_place(Path(mix.named["path"]), out_dir, stem, named, "", None, []))
        artifacts.append(
            _place(mix.path, out_dir, stem, target.label, mix.quantize_log, _section(mix, state), warnings)
        )
    return artifacts, state.to_json()


def _section(mix: Mix, state) -> dict:
    data = mix.to_json()
    facts = state.to_json()
    data["search"] = {"calibration": facts["calibration"], "seconds": facts["seconds"]}
    data["kl_measured_on"] = "the calibration text, against the f16 intermediate (llama-perplexity)"
    data["kl_weights"] = EVAL_WEIGHTS  # every candidate measured with EVAL_WEIGHT_FLAGS (calibrate._flags)
    return data


def _place(
    src: Path, out_dir: Path, stem: str, label: str, quantize_log: str, extra: dict | None, warnings: list[str]
) -> BudgetArtifact:
    name = f"{stem}-{label}.gguf"
    with atomic_dir(out_dir / label, overwrite=True) as tmp:
        os.replace(src, tmp / name)
    return BudgetArtifact(label, out_dir / label / name, quantize_log, extra, warnings)
