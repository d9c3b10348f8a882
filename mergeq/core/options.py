"""One schema per options dataclass: each field's metadata (help, choices, unit, range, flag, TOML key) makes both
the command-line flags (argparse) and the validation of a TOML table, so an option is defined once.

    @dataclass(frozen=True)
    class GGUFOptions:
        imatrix_ctx: int = option(512, help="llama-imatrix context", unit="tokens", range=(8, None))
        threads: int | None = option(None, help="llama.cpp threads", default_help="all cores", range=(1, None))
        cache: Path | None = None  # no metadata: an internal setting, neither a flag nor a key

    add_options(parser, GGUFOptions)                      # --imatrix-ctx N, --threads N
    from_namespace(GGUFOptions, parser.parse_args(argv))  # the dataclass, checked
    from_table(GGUFOptions, toml_table, problem=...)      # the same dataclass from [gguf], every problem reported

A dataclass may define `checked(self)` for what spans fields (and to normalise values); it returns the instance
to use and raises OptionError naming the field. Paths are given to the caller's `path_of` hook (TOML paths are
relative to the file) as path_of(value, exists=WHAT, text=PURPOSE); text options are resolved by the app at its
edge (mergeq.textopts).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path

from mergeq.core.errors import MergeqError

META = "mergeq.option"
SCALARS = (bool, int, float, str, Path)


class OptionError(MergeqError):
    """An option's value is wrong; `field` names the dataclass field (the CLI flag / TOML key is derived)."""

    def __init__(self, field: str, message: str, *, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.field = field


@dataclass(frozen=True)
class Opt:
    """The metadata of one option field; see option()."""

    help: str
    flag: str | None = ""  # "" = --field-name; None = no flag that sets the value (bools: see off_flag)
    off_flag: str | None = None  # a bool: the flag that sets False (`--no-validate`, `--asym`)
    off_help: str | None = None
    key: str = ""  # TOML key ("" = the field name)
    choices: tuple | None = None
    unit: str | None = None  # shown in the help; with scale, the unit the value is given in
    scale: float | None = None  # stored value = given value x scale (e.g. GiB -> bytes)
    range: tuple | None = None  # (lowest, highest), inclusive; None for an open end
    metavar: str | None = None
    repeat: bool = False  # a repeatable flag / a TOML list; stored as a tuple
    parse: Callable | None = None  # a command-line string -> value (raise ValueError with the reason)
    parse_toml: Callable | None = None  # (TOML value, path_of) -> value; default: as a command-line string would be
    value_type: type | None = None  # the type the value is given in, where it differs from the field's
    exists: str | None = None  # a path that must exist: what it is ("base model"), for the message
    text: str | None = None  # a text option (FILE, FILE.parquet:COLUMN or `demo`): what it is for
    required: bool = False
    default_help: str | None = None  # how the help names the default (for None or computed defaults)
    cli: bool = True
    toml: bool = True


def option(default=MISSING, *, default_factory=MISSING, **meta) -> dataclasses.Field:
    """A dataclass field that is an option. `meta` are Opt's fields (help is required)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={META: Opt(**meta)})


@dataclass(frozen=True)
class Spec:
    """One option of a dataclass, resolved: its field, type, default, flags and key."""

    name: str
    opt: Opt
    kind: type | None  # the scalar type a value is given as (None: opt.parse decides)
    optional: bool  # None is a value
    default: object

    @property
    def flag(self) -> str | None:
        return f"--{self.name.replace('_', '-')}" if self.opt.flag == "" else self.opt.flag

    @property
    def key(self) -> str:
        return self.opt.key or self.name

    def shown_default(self) -> str | None:
        if self.opt.default_help is not None:
            return self.opt.default_help
        if self.default in (None, ()) or self.kind is bool or self.default is MISSING:
            return None
        value = self.default
        if self.opt.scale:
            value = value / self.opt.scale
            value = int(value) if float(value).is_integer() else value
        if isinstance(value, (tuple, list)):
            value = " ".join(map(str, value))
        return f"{value} {self.opt.unit}" if self.opt.unit else str(value)

    def range_text(self) -> str:
        low, high = self.opt.range
        return (
            f"{low} to {high}"
            if low is not None and high is not None
            else f"at least {low}"
            if low is not None
            else f"at most {high}"
        )

    def help_text(self) -> str:
        notes = []
        if (shown := self.shown_default()) is not None:
            notes.append(f"default: {shown}")
        if self.opt.range:
            notes.append(self.range_text())
        return self.opt.help + (f" ({'; '.join(notes)})" if notes else "")


def specs(cls) -> list[Spec]:
    """The options of dataclass `cls` in field order (fields without option metadata are internal)."""
    found = []
    for f in dataclasses.fields(cls):
        opt = f.metadata.get(META)
        if opt is None:
            continue
        kind, optional = _scalar_type(_hint(cls, f))
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else MISSING)
        )
        found.append(Spec(f.name, opt, opt.value_type or kind, optional, default))
    return found


def _hint(cls, f: dataclasses.Field):
    """The field's type; None where it names a type imported only for type checking (opt.parse decides)."""
    if not isinstance(f.type, str):
        return f.type
    for owner in cls.__mro__:
        if f.name in owner.__dict__.get("__annotations__", {}):
            try:
                return eval(f.type, vars(sys.modules[owner.__module__]), {})  # noqa: S307 (our own annotations)
            except NameError:
                return None
    return None


def _scalar_type(hint) -> tuple[type | None, bool]:
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else None
    if typing.get_origin(hint) in (tuple, list, Sequence) or hint in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        hint = args[0] if len(args) == 1 else None
    return (hint if hint in SCALARS else None), optional


# ------------------------------------------------------------------------------------------ one value


def convert(spec: Spec, value, *, from_text: bool, path_of: Callable | None = None):
    """One given value (a command-line string, or a TOML value) as the field stores it; ValueError says why not."""
    opt = spec.opt
    if not from_text and opt.parse_toml is not None:
        return opt.parse_toml(value, path_of)
    if opt.parse is not None and (from_text or isinstance(value, str)):
        value = opt.parse(value)
    elif spec.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected bool (true or false), got {_typed(value)}")
    elif spec.kind in (int, float):
        if from_text:
            try:
                value = spec.kind(value)
            except ValueError:
                want = "an integer" if spec.kind is int else "a number"
                raise ValueError(f"expected {want}, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float) if spec.kind is float else int):
            raise ValueError(f"expected {spec.kind.__name__}, got {_typed(value)}")
    elif spec.kind in (str, Path):
        if not isinstance(value, str):
            raise ValueError(f"expected str, got {_typed(value)}")
        if spec.kind is Path:
            value = path_of(value, exists=opt.exists, text=opt.text) if path_of is not None else Path(value)
    elif not from_text and isinstance(value, (dict, list)):
        raise ValueError(f"expected a plain value, got {_typed(value)}")
    if opt.choices is not None and value not in opt.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, opt.choices))}")
    if opt.range is not None:
        low, high = opt.range
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"{value} is out of range: {spec.range_text()}")
    if opt.scale:
        value = int(value * opt.scale)
    return value


def _typed(value) -> str:
    return f"{type(value).__name__} {value!r}"


# ------------------------------------------------------------------------------------------ command line


def add_options(
    parser: argparse.ArgumentParser, cls, *, only: Sequence[str] | None = None, flags: dict[str, str] | None = None
) -> None:
    """Add a flag for every command-line option of `cls` (or of the fields in `only`); `flags` renames a
    field's flag for this command."""
    for spec in specs(cls):
        if not spec.opt.cli or (only is not None and spec.name not in only):
            continue
        flag = (flags or {}).get(spec.name, spec.flag)
        if spec.kind is bool:
            _add_switch(parser, spec, flag)
            continue
        parser.add_argument(
            flag,
            dest=spec.name,
            action="append" if spec.opt.repeat else "store",
            type=_argparse_type(spec),
            default=None if spec.opt.repeat else spec.default,
            choices=None if spec.opt.scale else spec.opt.choices,
            required=spec.opt.required and not spec.opt.text,
            metavar=_metavar(spec, flag),
            help=spec.help_text(),
        )


def _metavar(spec: Spec, flag: str) -> str | None:
    if spec.opt.metavar or spec.opt.choices:
        return spec.opt.metavar
    if spec.opt.scale:
        return spec.opt.unit.upper()
    return flag.lstrip("-").upper().replace("-", "_")


def _add_switch(parser, spec: Spec, flag: str | None) -> None:
    target = parser.add_mutually_exclusive_group() if flag and spec.opt.off_flag else parser
    if flag:
        target.add_argument(flag, dest=spec.name, action="store_true", default=spec.default, help=spec.opt.help)
    if spec.opt.off_flag:
        target.add_argument(
            spec.opt.off_flag,
            dest=spec.name,
            action="store_false",
            help=spec.opt.off_help or spec.opt.help,
            **({} if flag else {"default": spec.default}),
        )


def _argparse_type(spec: Spec):
    def parse(text: str):
        try:
            return convert(spec, text, from_text=True)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = (spec.kind or str).__name__
    return parse


def from_namespace(cls, namespace: argparse.Namespace, *, only: Sequence[str] | None = None):
    """The dataclass from parsed flags (of the fields in `only`, as add_options was given; the others keep their
    defaults), then checked()."""
    values = {}
    for spec in specs(cls):
        if spec.opt.cli and (only is None or spec.name in only) and hasattr(namespace, spec.name):
            value = getattr(namespace, spec.name)
            if spec.opt.repeat:
                value = spec.default if value is None else tuple(value)
            values[spec.name] = value
    return _checked(cls(**values))


def _checked(options):
    check = getattr(options, "checked", None)
    return check() if check is not None else options


def flag_of(cls, field: str) -> str:
    for spec in specs(cls):
        if spec.name == field:
            return spec.flag or spec.opt.off_flag or spec.key
    return field


# ------------------------------------------------------------------------------------------ TOML


def from_table(
    cls, table: dict, *, problem: Callable[[str, str], None], path_of: Callable | None = None, fixed: dict | None = None
):
    """The dataclass from one TOML table, or None; every problem goes to problem(key, message) ("" for the
    table itself). Keys are the fields' TOML keys; values are checked as the command line checks them."""
    if not isinstance(table, dict):
        problem("", f"must be a table, got {_typed(table)}")
        return None
    by_key = {s.key: s for s in specs(cls) if s.opt.toml}
    values, bad = dict(fixed or {}), False
    for key, raw in table.items():
        spec = by_key.get(key)
        if spec is None:
            problem(key, f"unknown key; allowed keys are {', '.join(sorted(by_key))}")
            bad = True
            continue
        try:
            values[spec.name] = _table_value(spec, raw, path_of)
        except ValueError as err:
            problem(key, str(err))
            bad = True
    for spec in by_key.values():
        missing = spec.key not in table or values.get(spec.name, None) == ()  # an empty list gives nothing
        if spec.opt.required and not spec.opt.text and missing:
            problem(spec.key, f"missing: {spec.opt.help}")
            bad = True
    if bad:
        return None
    try:
        return _checked(cls(**values))
    except OptionError as err:
        problem(next((s.key for s in by_key.values() if s.name == err.field), ""), str(err))
    except MergeqError as err:
        problem("", str(err))
    return None


def _table_value(spec: Spec, raw, path_of):
    if spec.opt.repeat:
        items = raw if isinstance(raw, list) else [raw]
        return tuple(convert(spec, item, from_text=False, path_of=path_of) for item in items)
    if isinstance(raw, list):
        raise ValueError(f"expected one value, got a list {raw!r}")
    return convert(spec, raw, from_text=False, path_of=path_of)


def table_values(options, *, surface: str = "toml") -> dict:
    """The options as their TOML keys (surface "toml") or field names (surface "cli") -> plain values."""
    out = {}
    for spec in specs(type(options)):
        if getattr(spec.opt, surface):
            out[spec.key if surface == "toml" else spec.name] = getattr(options, spec.name)
    return out
