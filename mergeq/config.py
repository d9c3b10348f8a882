"""The pipeline config (TOML): parsed, fully validated before any work, and written back resolved.

Each table is read by the schema of its options dataclass (mergeq.core.options): [merge] by merge.options.MergeConfig,
[eval] by exporters.eval_options.EvalOptions, [gguf] / [awq] / [gptq] by the exporter's own. The command-line flags
come from the same dataclasses, so a key is the flag's field name and takes the values the flag takes.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from exporters.eval_options import EvalOptions
from exporters.registry import EXPORTER_MODULES, get_exporter
from merge.options import MergeConfig
from mergeq.core.errors import MergeqError
from mergeq.core.options import from_table, specs, table_values
from mergeq.core.texts import FORMATS_HELP, split_column
from mergeq.textopts import DEMO, resolve_text_option

TOP_KEYS = {"merge", "eval", "exports"} | set(EXPORTER_MODULES)


@dataclass
class PipelineConfig:
    merge: MergeConfig  # out, overwrite and eval_text are the pipeline's own: set when the merge stage runs
    evaluation: EvalOptions
    exports: dict[str, object] = field(default_factory=dict)  # target -> that exporter's options dataclass
    source: Path | None = None  # the TOML file, None for the built-in demo

    def resolved(self) -> dict:
        """Everything the run will use, as plain JSON data (written next to the outputs): each table's keys."""
        return {
            "merge": plain(table_values(self.merge)),
            "eval": plain(table_values(self.evaluation)),
            "exports": {target: self.export_values(target) for target in self.exports},
            "source": str(self.source) if self.source else None,
        }

    def export_values(self, target: str) -> dict:
        return plain(table_values(self.exports[target]))


def plain(value):
    """Options as JSON data: dataclasses as dicts, paths as strings, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


class ConfigError(MergeqError):
    """A mistake in the config file; the message names the key and, where known, its line."""


def key_line(text: str, section: str, key: str) -> int | None:
    """The 1-based line of `key` inside `[section]` (or of the section header when key is empty)."""
    current = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", stripped)
        if header:
            current = header.group(1)
            if current == section and not key:
                return number
            continue
        if current == section and key and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return number
    return None


class _Reader:
    """Validates one parsed TOML document, collecting every problem before reporting them together."""

    def __init__(self, path: Path | None, text: str):
        self.path, self.text, self.problems = path, text, []

    def where(self, section: str, key: str = "") -> str:
        line = key_line(self.text, section, key) if self.path else None
        name = f"[{section}]" + (f" {key}" if key else "")
        place = f"{self.path}:{line}" if line else str(self.path or "config")
        return f"{place}: {name}"

    def problem(self, section: str, key: str, message: str) -> None:
        self.problems.append(f"{self.where(section, key)}: {message}")

    def table(self, section: str, cls, table, *, require_texts: bool = True):
        """Table `section` as dataclass `cls` by its schema; text options resolved and, with require_texts,
        the required ones present."""
        options = from_table(
            cls, table, problem=lambda key, message: self.problem(section, key, message), path_of=self.path_of
        )
        if options is None or not require_texts:
            return options
        for spec in specs(cls):
            if spec.opt.text and spec.opt.required and spec.opt.toml and getattr(options, spec.name) is None:
                self.problem(
                    section,
                    spec.key,
                    f'missing: the {spec.opt.text} text ({FORMATS_HELP}); {spec.key} = "{DEMO}" uses the demo\'s text',
                )
                return None
        return options

    def path_of(self, value: str, *, exists: str | None = None, text: str | None = None) -> Path:
        """A path as the config gives it: relative to the config file; a text may be `demo` or FILE:COLUMN."""
        if text and value == DEMO:
            return resolve_text_option(value, option=DEMO, purpose=text)
        file, column = split_column(value) if text else (Path(value), None)
        path = Path(file).expanduser()
        if not path.is_absolute() and self.path is not None:
            path = self.path.parent / path
        what = f"{text} text" if text else exists
        if what and not path.exists():
            raise ValueError(f"{what} {path} does not exist")
        return Path(f"{path}:{column}") if column else path


def load_config(path: Path) -> PipelineConfig:
    """Read and validate a pipeline TOML file. Raises ConfigError listing every problem found."""
    data, text = read_toml(path)
    return parse_config(data, path=Path(path).resolve(), text=text)


def read_toml(path: Path) -> tuple[dict, str]:
    """A config file's parsed TOML and its text (for line numbers); ConfigError when unreadable or not TOML."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err


def parse_config(data: dict, *, path: Path | None = None, text: str = "") -> PipelineConfig:
    reader = _Reader(path, text)
    for key in data:
        if key not in TOP_KEYS:
            reader.problem(key, "", f"unknown section; allowed sections are {', '.join(sorted(TOP_KEYS))}")
    merge = _read_merge(reader, data.get("merge"))
    evaluation = _read_eval(reader, data.get("eval", {}))
    exports = {}
    for target in EXPORTER_MODULES:
        if target in data:
            options = reader.table(target, get_exporter(target).options, data[target])
            if options is not None:
                exports[target] = options
    if not exports and not reader.problems:
        reader.problem("exports", "", f"no export section: add at least one of [{'], ['.join(EXPORTER_MODULES)}]")
    if reader.problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(reader.problems))
    return PipelineConfig(merge=merge, evaluation=evaluation, exports=exports, source=path)


def _read_merge(reader: _Reader, table) -> MergeConfig | None:
    if not isinstance(table, dict):
        reader.problem("merge", "", "missing [merge] section with at least `base` and `adapters`")
        return None
    if table.get("base") is None:
        reader.problem("merge", "base", "missing: the fp16/bf16 base model directory")
    merge = reader.table("merge", MergeConfig, table)
    return merge if merge is not None and merge.base is not None else None


def _read_eval(reader: _Reader, table) -> EvalOptions:
    enabled = not (isinstance(table, dict) and table.get("enabled") is False)
    if not enabled:
        table = {k: v for k, v in table.items() if k != "text"}  # evaluation off: its text is not read
    return reader.table("eval", EvalOptions, table, require_texts=enabled) or EvalOptions()
