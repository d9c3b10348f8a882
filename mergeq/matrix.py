"""The export matrix: several adapter sets over one or several bases, each exported to every configured format.

A config with `[[model]]` tables is a matrix. Each table names one artifact row (`name`, also its output directory
`OUT/NAME/`) and takes the keys of `[merge]`; a `[merge]` table beside them holds the defaults they share (a
common `base`, `dtype`, ...). `[eval]` and the exporter sections apply to every row. Each row is checked exactly as
a single-model config is (mergeq.config.parse_config), and every problem of every row is reported at once.

A config without `[[model]]` is today's single-model config: one row, written straight into OUT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from exporters.report import ArtifactReport
from mergeq.config import ConfigError, PipelineConfig, key_line, parse_config, read_toml
from mergeq.core.errors import MergeqError

MODEL_TABLE = "model"
SINGLE = ""  # the row name of a single-model run (written into OUT itself)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass
class Matrix:
    """Rows of the matrix, in config order: row name -> that row's pipeline config."""

    models: dict[str, PipelineConfig] = field(default_factory=dict)
    source: Path | None = None

    @property
    def single(self) -> bool:
        return list(self.models) == [SINGLE]

    def out_dir(self, out: Path, name: str) -> Path:
        return Path(out) if name == SINGLE else Path(out) / name

    def resolved(self) -> dict:
        if self.single:
            return self.models[SINGLE].resolved()
        return {
            "models": {name: config.resolved() for name, config in self.models.items()},
            "source": str(self.source) if self.source else None,
        }


def single(config: PipelineConfig) -> Matrix:
    return Matrix({SINGLE: config}, config.source)


def load_matrix(path: Path) -> Matrix:
    """Read a pipeline TOML file: a matrix when it has `[[model]]` tables, else one model. ConfigError lists every
    problem found."""
    data, text = read_toml(path)
    return parse_matrix(data, path=Path(path).resolve(), text=text)


def parse_matrix(data: dict, *, path: Path | None = None, text: str = "") -> Matrix:
    if MODEL_TABLE not in data:
        return single(parse_config(data, path=path, text=text))
    place = f"{path}:{key_line(text, MODEL_TABLE, '') or 1}" if path else "config"
    rows = data[MODEL_TABLE]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(
            f"{place}: [[model]] must be one or more tables, each with a `name` and the keys of "
            f"[merge] (`base`, `adapters`, ...)"
        )
    defaults = data.get("merge", {})
    if not isinstance(defaults, dict) or "adapters" in defaults:
        raise ConfigError(
            f"{place}: with [[model]] tables, [merge] holds only the defaults they share (base, "
            f"dtype, ...); give each model's `adapters` in its own [[model]] table"
        )
    shared = {key: value for key, value in data.items() if key not in (MODEL_TABLE, "merge")}
    models: dict[str, PipelineConfig] = {}
    problems: list[str] = []
    for number, row in enumerate(rows, 1):
        name = row.get("name")
        label = f"[[model]] #{number}" + (f" ({name})" if isinstance(name, str) else "")
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(
                f"{place}: {label}: `name` must be a directory name (letters, digits, '.', '_', '-'), got {name!r}"
            )
            continue
        if name in models:
            problems.append(f"{place}: {label}: the name {name!r} is used twice; each model needs its own")
            continue
        merge = {**defaults, **{key: value for key, value in row.items() if key != "name"}}
        try:
            models[name] = parse_config({**shared, "merge": merge}, path=path, text=text)
        except ConfigError as err:
            problems += [f"{label}: {line.strip()}" for line in str(err).splitlines()[1:]] or [f"{label}: {err}"]
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return Matrix(models, path)


def check_layout(matrix: Matrix, out: Path) -> None:
    """Rows write to OUT/NAME: a name may not collide with what a run writes into OUT itself."""
    reserved = {"summary.json", "summary.md", "summary.png", "resolved_config.json", ".mergeq"}
    for name in matrix.models:
        if name in reserved:
            raise MergeqError(
                f"model name {name!r} collides with a file mergeq writes into {out}", hint="rename that [[model]] table"
            )


@dataclass
class MatrixReport(ArtifactReport):
    """A report in the matrix summary: its row's name leads its label."""

    model: str = ""

    @property
    def label(self) -> str:
        return f"{self.model}: {self.format} {self.quant}" if self.model else super().label


def matrix_reports(rows: dict[str, list[ArtifactReport]]) -> list[ArtifactReport]:
    """Every row's reports, paths made relative to the matrix output (OUT/NAME/...), labels led by the row."""
    merged = []
    for name, reports in rows.items():
        for report in reports:
            fields = {f: getattr(report, f) for f in report.__dataclass_fields__}
            merged.append(MatrixReport(**{**fields, "path": f"{name}/{report.path}"}, model=name))
    return merged
