"""third_party/llama.cpp.toml, read and validated once: what llama.cpp mergeq uses and how it builds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from mergeq.core.errors import MergeqError

REPO_ROOT = Path(__file__).resolve().parents[2]
PIN_FILE = REPO_ROOT / "third_party" / "llama.cpp.toml"


@dataclass(frozen=True)
class Pin:
    """third_party/llama.cpp.toml, validated."""

    package: str
    version: str
    filename: str
    sha256: str
    tree: str
    repository: str
    commit: str
    gguf_py_version: str
    targets: tuple[str, ...]
    cmake_args: tuple[str, ...]
    quant_types: tuple[str, ...]
    needs_imatrix: frozenset[str]
    default_types: dict[str, str] = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as handle:
        return tomllib.load(handle)


@lru_cache(maxsize=4)
def load_pin(path: Path = PIN_FILE) -> Pin:
    if not Path(path).is_file():
        raise MergeqError(f"the llama.cpp pin {path} is missing", hint="run mergeq from its source checkout")
    data = _load_toml(Path(path))
    try:
        source, llama, build, quant = data["source"], data["llama_cpp"], data["build"], data["quantize"]
        return Pin(
            package=source["package"],
            version=source["version"],
            filename=source["filename"],
            sha256=source["sha256"].lower(),
            tree=source["tree"].strip("/"),
            repository=llama["repository"],
            commit=llama["commit"],
            gguf_py_version=llama["gguf_py_version"],
            targets=tuple(build["targets"]),
            cmake_args=tuple(build["cmake_args"]),
            quant_types=tuple(quant["types"]),
            needs_imatrix=frozenset(quant["needs_imatrix"]),
            default_types=dict(quant.get("default_type", {})),
        )
    except KeyError as err:
        raise MergeqError(f"{path}: missing key {err}", hint="restore third_party/llama.cpp.toml from git") from err


def canonical_quant_type(name: str, pin: Pin | None = None) -> str | None:
    """The llama-quantize spelling of a type name (matched case-insensitively), or None if unknown."""
    pin = pin or load_pin()
    lookup = {t.lower(): t for t in pin.quant_types}
    return lookup.get(name.strip().lower())


def version_info() -> dict:
    """What identifies the pinned llama.cpp (static, from the pin: cheap, and the same on every machine)."""
    pin = load_pin()
    return {
        "package": pin.package,
        "version": pin.version,
        "sha256": pin.sha256,
        "llama_cpp_commit": pin.commit,
        "gguf_py_version": pin.gguf_py_version,
    }
