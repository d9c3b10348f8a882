"""The text options at the command-line/config edge. The demo's texts are never a silent default: a missing option
is an error that names the option and the formats, and the literal `demo` means the demo's own text (for the
demo itself, or when asked for by name). Library code (mergeq.core.texts) only ever receives a path."""

from __future__ import annotations

from pathlib import Path

from mergeq.core.errors import MergeqError
from mergeq.core.texts import FORMATS_HELP

DEMO = "demo"


def resolve_text_option(value: Path | str | None, *, option: str, purpose: str) -> Path:
    """The text a command was given: a path, or `demo` for the demo's own text. A missing text is an error:
    mergeq never scores or calibrates a user's model on the demo's docstrings without being asked to."""
    if value is None or str(value).strip() == "":
        raise MergeqError(
            f"no {purpose} text given: pass {option} FILE ({FORMATS_HELP})",
            hint=f"use text like what the model will see in use (for a chat fine-tune: its chat data); "
            f"{option} {DEMO} uses the demo's standard-library docstrings",
        )
    if str(value) == DEMO:
        from mergeq.demo import demo_assets

        assets = demo_assets()
        return Path(assets.calib_text if purpose == "calibration" else assets.eval_text)
    return Path(value)


def resolve_texts(options, *, flags: dict[str, str] | None = None):
    """`options` (an options dataclass, mergeq.core.options) with every text option given resolved (`demo` -> the
    demo's text) and every required one present; an error names the option's flag (`flags` renames it)."""
    from dataclasses import replace

    from mergeq.core.options import specs

    changes = {}
    for spec in specs(type(options)):
        value = getattr(options, spec.name)
        if spec.opt.text and (value is not None or spec.opt.required):
            flag = (flags or {}).get(spec.name, spec.flag)
            changes[spec.name] = resolve_text_option(value, option=flag, purpose=spec.opt.text)
    return replace(options, **changes)
