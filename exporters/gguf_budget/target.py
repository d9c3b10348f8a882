"""What a size target says: a file size ("2.5GB", "700MiB"), bits per weight ("4.5bpw") or "like:Q4_K_M"
(the size of that named llama-quantize mix made from the same intermediate and imatrix)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mergeq.core.errors import MergeqError

UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_BPW = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*bpw\s*$", re.IGNORECASE)
TARGET_HELP = "a file size (2.5GB, 700MiB, 123456789B), bits per weight (4.5bpw) or like:TYPE (like:Q4_K_M)"


@dataclass(frozen=True)
class Target:
    kind: str  # "size", "bpw" or "like"
    value: float | int | str  # bytes, bits per weight, or a llama-quantize type
    spec: str  # as the user wrote it

    @property
    def label(self) -> str:
        """The artifact's name: its directory and the `quant` of its report."""
        if self.kind == "like":
            return f"MIX-like-{self.value}"
        if self.kind == "bpw":
            return f"MIX-{self.value:g}bpw"
        return f"MIX-{self.spec.replace(' ', '')}"


def parse_target(spec: str, what: str = "--target", known_types: tuple[str, ...] = ()) -> Target:
    text = str(spec).strip()
    if text.lower().startswith("like:"):
        name = text[5:].strip().upper()
        if known_types and name not in known_types:
            raise MergeqError(
                f"{what} {spec!r}: {name!r} is not a llama-quantize type", hint=f"name one of: {', '.join(known_types)}"
            )
        return Target("like", name, text)
    if match := _BPW.match(text):
        bpw = float(match.group(1))
        if not 1.0 <= bpw <= 16.0:
            raise MergeqError(f"{what} {spec!r}: {bpw} bits per weight is outside 1..16")
        return Target("bpw", bpw, text)
    match = _SIZE.match(text)
    unit = (match.group(2) or "B").upper() if match else ""
    if not match or unit not in UNITS:
        raise MergeqError(f"{what} {spec!r} is not a size target", hint=f"give {TARGET_HELP}")
    size = int(float(match.group(1)) * UNITS[unit])
    if size <= 0:
        raise MergeqError(f"{what} {spec!r}: the size must be positive")
    return Target("size", size, text)


def option_name(target: Target) -> str:
    """The command-line option that states this kind of target."""
    return {"size": "--target-size", "bpw": "--target-bpw", "like": "--target"}[target.kind]


def check_targets(specs: tuple[str, ...], imatrix: bool, known_types: tuple[str, ...]) -> list[Target]:
    """The targets, parsed; they need the imatrix (the search measures errors the way the file is made)."""
    targets = [parse_target(spec, "--target", known_types) for spec in specs]
    if targets and not imatrix:
        raise MergeqError(
            f"{option_name(targets[0])} {targets[0].spec} needs an importance matrix",
            hint="add --imatrix --calib FILE (the fine-tune's own text): the search measures each "
            "tensor's error with it and calibrates on that text",
        )
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise MergeqError(f"the same size target is given twice: {', '.join(specs)}")
    return targets
