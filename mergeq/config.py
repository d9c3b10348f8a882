"""The pipeline config (TOML): parsed, fully validated before any work, and written back resolved.

Exporter sections take exactly the options of `mergeq export TARGET` (same names, `_` for `-`), so
the CLI and the config share one definition of every option: the exporter's own argparse spec.
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exporters.registry import EXPORTER_MODULES, get_exporter
from mergeq.core.errors import MergeqError
from mergeq.core.texts import FORMATS_HELP, split_column
from mergeq.textopts import DEMO, resolve_text_option

DTYPES = ("float16", "bfloat16")
MERGE_KEYS = {"base": str, "qlora_base": str, "adapters": list, "dtype": str, "validate": bool, "qlora": str}
QLORA_MODES = ("auto", "nf4", "fp4", "off")
INT4_TARGETS = ("awq", "gptq")
ADAPTER_KEYS = {"path": str, "weight": (int, float)}
EVAL_KEYS = {"text": str, "enabled": bool}
TOP_KEYS = {"merge", "eval", "exports"} | set(EXPORTER_MODULES)


@dataclass(frozen=True)
class AdapterSpec:
    path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class MergeSpec:
    base: Path
    adapters: tuple[AdapterSpec, ...]
    qlora_base: Path | None = None
    dtype: str = "float16"
    validate: bool = True
    qlora: str = "auto"  # auto | nf4 | fp4 | off (merge.qlora_detect)


@dataclass(frozen=True)
class EvalSpec:
    text: Path | None = None
    enabled: bool = True


@dataclass
class PipelineConfig:
    merge: MergeSpec
    evaluation: EvalSpec
    exports: dict[str, object] = field(default_factory=dict)  # target -> that exporter's options dataclass
    export_args: dict[str, dict] = field(default_factory=dict)  # target -> resolved option values
    source: Path | None = None  # the TOML file, None for the built-in demo

    def resolved(self) -> dict:
        """Everything the run will use, as plain JSON data (written next to the outputs)."""
        return {
            "merge": json.loads(json.dumps(asdict(self.merge), default=str)),
            "eval": json.loads(json.dumps(asdict(self.evaluation), default=str)),
            "exports": json.loads(json.dumps(self.export_args, default=str)),
            "source": str(self.source) if self.source else None,
        }


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

    def check_keys(self, section: str, table: dict, allowed: dict) -> None:
        for key, value in table.items():
            if key not in allowed:
                self.problem(section, key, f"unknown key; allowed keys are {', '.join(sorted(allowed))}")
            elif not isinstance(value, allowed[key]) or (allowed[key] is not bool and isinstance(value, bool)):
                want = allowed[key]
                names = "/".join(t.__name__ for t in want) if isinstance(want, tuple) else want.__name__
                self.problem(section, key, f"expected {names}, got {type(value).__name__} {value!r}")

    def text_path(self, section: str, key: str, value: str | None, purpose: str) -> Path | None:
        """A calibration/evaluation text: required, `demo` for the demo's, FILE or FILE.parquet:COLUMN."""
        if value is None:
            self.problem(section, key, f"missing: the {purpose} text ({FORMATS_HELP}); "
                                       f"{key} = \"{DEMO}\" uses the demo's text")
            return None
        if value == DEMO:
            return resolve_text_option(value, option=key, purpose=purpose)
        file, column = split_column(value)
        found = self.existing_path(section, key, str(file), f"{purpose} text")
        return None if found is None else Path(f"{found}:{column}" if column else found)

    def existing_path(self, section: str, key: str, value: str | None, what: str) -> Path | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute() and self.path is not None:
            path = self.path.parent / path
        if not path.exists():
            self.problem(section, key, f"{what} {path} does not exist")
        return path


def load_config(path: Path) -> PipelineConfig:
    """Read and validate a pipeline TOML file. Raises ConfigError listing every problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    return parse_config(data, path=path.resolve(), text=text)


def parse_config(data: dict, *, path: Path | None = None, text: str = "") -> PipelineConfig:
    reader = _Reader(path, text)
    for key in data:
        if key not in TOP_KEYS:
            reader.problem(key, "", f"unknown section; allowed sections are {', '.join(sorted(TOP_KEYS))}")
    merge = _read_merge(reader, data.get("merge"))
    evaluation = _read_eval(reader, data.get("eval", {}))
    exports, export_args = {}, {}
    for target in EXPORTER_MODULES:
        if target in data:
            options = _read_export(reader, target, data[target])
            if options is not None:
                exports[target], export_args[target] = options
    if not exports and not reader.problems:
        reader.problem("exports", "", f"no export section: add at least one of [{'], ['.join(EXPORTER_MODULES)}]")
    if reader.problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(reader.problems))
    return PipelineConfig(merge=merge, evaluation=evaluation, exports=exports, export_args=export_args, source=path)


def _read_merge(reader: _Reader, table) -> MergeSpec | None:
    if not isinstance(table, dict):
        reader.problem("merge", "", "missing [merge] section with at least `base` and `adapters`")
        return None
    reader.check_keys("merge", table, MERGE_KEYS)
    base = reader.existing_path("merge", "base", table.get("base"), "base model")
    if base is None:
        reader.problem("merge", "base", "missing: the fp16/bf16 base model directory")
    qlora = reader.existing_path("merge", "qlora_base", table.get("qlora_base"), "QLoRA 4-bit base")
    dtype = table.get("dtype", "float16")
    if dtype not in DTYPES:
        reader.problem("merge", "dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    qlora_mode = table.get("qlora", "auto")
    if qlora_mode not in QLORA_MODES:
        reader.problem("merge", "qlora", f"{qlora_mode!r} is not one of {', '.join(QLORA_MODES)}")
    adapters = []
    raw = table.get("adapters", [])
    if not raw:
        reader.problem("merge", "adapters", "missing: give at least one adapter as {path = \"...\", weight = 1.0}")
    for entry in raw if isinstance(raw, list) else []:
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            reader.problem("merge", "adapters", f"each adapter is a path or {{path, weight}}, got {entry!r}")
            continue
        reader.check_keys("merge", entry, ADAPTER_KEYS)
        adapter = reader.existing_path("merge", "adapters", entry.get("path"), "adapter")
        if adapter is not None:
            adapters.append(AdapterSpec(adapter, float(entry.get("weight", 1.0))))
    if base is None:
        return None
    return MergeSpec(base, tuple(adapters), qlora, dtype, bool(table.get("validate", True)), qlora_mode)


def _read_eval(reader: _Reader, table) -> EvalSpec:
    if not isinstance(table, dict):
        reader.problem("eval", "", "must be a table")
        return EvalSpec()
    reader.check_keys("eval", table, EVAL_KEYS)
    enabled = bool(table.get("enabled", True))
    text = reader.text_path("eval", "text", table.get("text"), "evaluation") if enabled else None
    return EvalSpec(text=text, enabled=enabled)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise argparse.ArgumentError(None, message)


def export_parser(target: str) -> argparse.ArgumentParser:
    """The exporter's own option parser, as `mergeq export TARGET` uses it (errors raise, never exit)."""
    parser = _RaisingParser(prog=f"[{target}]", exit_on_error=False, add_help=False)
    get_exporter(target).add_arguments(parser)
    return parser


def _read_export(reader: _Reader, target: str, table):
    if not isinstance(table, dict):
        reader.problem(target, "", "must be a table of that exporter's options")
        return None
    parser = export_parser(target)
    actions: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if action.option_strings:
            actions.setdefault(action.dest, []).append(action)
    argv: list[str] = []
    for key, value in table.items():
        if key not in actions:
            reader.problem(target, key, f"unknown option; {target} takes {', '.join(sorted(actions))}")
            continue
        action = actions[key][0]
        flag = _long_flag(action)
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                reader.problem(target, key, f"expected true/false, got {value!r}")
                continue
            # the flag that sets this value (`sym = false` may be spelled --asym, a store_false on dest sym)
            setters = [a for a in actions[key] if a.const is value]
            if setters:
                argv.append(_long_flag(setters[0]))
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not isinstance(action, argparse._AppendAction) and not action.nargs:
            reader.problem(target, key, f"expected one value, got a list {value!r}")
            continue
        if any(isinstance(v, (dict, list)) for v in values):
            reader.problem(target, key, f"expected plain values, got {value!r}")
            continue
        if isinstance(action, argparse._AppendAction):
            for item in values:
                argv += [flag, _scalar(item, reader, target)]
        else:
            argv += [flag, *(_scalar(item, reader, target) for item in values)]
    try:
        namespace = parser.parse_args(argv)
    except argparse.ArgumentError as err:
        reader.problem(target, "", f"invalid options: {err}")
        return None
    try:
        options = get_exporter(target).options_from_args(namespace)
    except MergeqError as err:
        reader.problem(target, "", str(err))
        return None
    if target in INT4_TARGETS and getattr(options, "method", None) != "rtn":
        raw = table.get("calib")
        options.calib = reader.text_path(target, "calib", None if raw is None else str(raw), "calibration")
        namespace.calib = options.calib
    return options, {k: v for k, v in sorted(vars(namespace).items())}


def _long_flag(action: argparse.Action) -> str:
    return next((f for f in action.option_strings if f.startswith("--")), action.option_strings[0])


def _scalar(value, reader: _Reader, target: str) -> str:
    if isinstance(value, str):
        path = Path(value).expanduser()
        if reader.path is not None and not path.is_absolute() and (reader.path.parent / path).exists():
            return str(reader.path.parent / path)
    return str(value)
