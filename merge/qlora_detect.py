"""Was this adapter trained on a 4-bit (QLoRA) base, and with which settings? Evidence, then a decision.

Evidence comes from what trainers leave behind, each piece recorded in the merge manifest:

- `base_model_name_or_path` in adapter_config.json (PEFT writes the name or folder the base was loaded from):
  a name in the hub's naming of pre-quantized bitsandbytes bases (`...-bnb-4bit`, unsloth's
  `...-unsloth-bnb-4bit`, `...-4bit`, `...-nf4`), or a local folder whose config.json holds a bitsandbytes
  `quantization_config`;
- a `config.json` beside the adapter with a bitsandbytes `quantization_config` (axolotl saves the trained
  model's config next to the adapter; so does a Trainer that saved the model config);
- the PEFT model card (`README.md`), which PEFT up to 0.10 wrote with "The following `bitsandbytes`
  quantization config was used during training:" and one `- key: value` line per setting;
- a trainer config beside the adapter (axolotl's YAML: `adapter: qlora`, `load_in_4bit: true`;
  TRL's model arguments: `load_in_4bit`, `bnb_4bit_quant_type`, `use_bnb_nested_quant`);
- a 4-bit base given by the user (`--qlora-base`, or a 4-bit `--base`).

`decide()` turns the evidence and `--qlora auto|nf4|fp4|off` into the base to merge into.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from merge.options import QLORA_MODES
from merge.qlora import QuantSettings
from mergeq.core.errors import MergeqError

log = logging.getLogger(__name__)

MODES = QLORA_MODES
# pre-quantized bitsandbytes bases as the hub names them (unsloth/...-bnb-4bit, .../...-4bit, ...-nf4)
NAME_4BIT = re.compile(
    r"(?:^|[-_./])(?:unsloth-)?(?:bnb[-_]?4bit|4bit|4-bit|int4[-_]bnb|(?P<type>nf4|fp4))(?:$|[-_./])", re.IGNORECASE
)
NAME_OTHER_QUANT = re.compile(r"(?:^|[-_./])(gptq|awq|gguf|exl2|hqq|aqlm|8bit|int8)(?:$|[-_./])", re.IGNORECASE)
CARD_PREFIX = "The following `bitsandbytes` quantization config was used during training:"
CARD_LINE = re.compile(r"^\s*-\s*(?P<key>[A-Za-z0-9_]+)\s*:\s*(?P<value>.*?)\s*$")
TRAINER_CONFIGS = (
    "*.yml",
    "*.yaml",
    "training_config.json",
    "trainer_config.json",
    "train_config.json",
    "axolotl_config.json",
    "model_args.json",
)
TRUE = ("true", "1", "yes")


@dataclass(frozen=True)
class Evidence:
    """One fact pointing at (or against) a 4-bit training base."""

    source: str  # "base_model_name_or_path", "config.json", "model card", "trainer config", "user"
    where: str  # file or option it came from
    detail: str  # what it says, in words
    four_bit: bool = True
    quant_type: str | None = None  # nf4 / fp4 when it says so
    double_quant: bool | None = None
    blocksize: int | None = None
    compute_dtype: str | None = None


@dataclass
class Decision:
    """The base to merge into, and why."""

    mode: str  # the --qlora value asked for
    trained_on_4bit: bool
    settings: QuantSettings | None  # requantize an fp16 base with these (None: merge into the base as given)
    target: str  # "fp16 base", "4-bit base given", "fp16 base requantized to nf4 (double quant)"
    evidence: list[Evidence] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    why: str = ""

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "trained_on_4bit": self.trained_on_4bit,
            "target": self.target,
            "why": self.why,
            "settings": None if self.settings is None else asdict(self.settings),
            "evidence": [{k: v for k, v in asdict(e).items() if v is not None} for e in self.evidence],
        }


# --------------------------------------------------------------------------------------------- evidence readers


def _bool(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE + ("false", "0", "no", "none"):
        return value.strip().lower() in TRUE
    return None


def _from_bnb_config(qc: dict, source: str, where: str) -> Evidence | None:
    """Evidence from a bitsandbytes quantization_config-like mapping (transformers' BitsAndBytesConfig keys)."""
    method = str(qc.get("quant_method", "bitsandbytes")).lower()
    four = _bool(qc.get("load_in_4bit", qc.get("_load_in_4bit")))
    if method != "bitsandbytes" or four is None:
        return None
    quant_type = str(qc.get("bnb_4bit_quant_type", "")).lower() or None
    double = _bool(qc.get("bnb_4bit_use_double_quant"))
    dtype = qc.get("bnb_4bit_compute_dtype")
    parts = (
        [f"load_in_4bit={four}"]
        + ([f"bnb_4bit_quant_type={quant_type}"] if quant_type else [])
        + ([f"bnb_4bit_use_double_quant={double}"] if double is not None else [])
        + ([f"bnb_4bit_compute_dtype={dtype}"] if dtype else [])
    )
    return Evidence(
        source,
        where,
        ", ".join(parts),
        four_bit=four,
        quant_type=quant_type if quant_type in ("nf4", "fp4") else None,
        double_quant=double,
        compute_dtype=str(dtype) if dtype else None,
    )


def from_name(name: str, where: str) -> Evidence | None:
    """A recorded base name in the hub's naming of 4-bit bases, or a local folder that is a 4-bit checkpoint."""
    path = Path(name)
    if path.is_absolute() and (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            config = {}
        qc = config.get("quantization_config") if isinstance(config, dict) else None
        found = _from_bnb_config(qc, "base_model_name_or_path", where) if isinstance(qc, dict) else None
        if found is None:  # a local checkpoint that is not bitsandbytes-quantized: its config says so
            return None
        return Evidence(
            found.source,
            where,
            f"recorded base {name} is a bitsandbytes checkpoint: " + found.detail,
            found.four_bit,
            found.quant_type,
            found.double_quant,
            compute_dtype=found.compute_dtype,
        )
    leaf = name.rstrip("/").rsplit("/", 1)[-1]  # the model's own name, not the folders or the hub org above it
    match = NAME_4BIT.search(leaf)
    if match:
        quant_type = (match["type"] or "").lower() or None
        return Evidence(
            "base_model_name_or_path",
            where,
            f"recorded base {name!r} is named like a bitsandbytes 4-bit base",
            quant_type=quant_type,
        )
    other = NAME_OTHER_QUANT.search(leaf)
    if other:
        return Evidence(
            "base_model_name_or_path",
            where,
            f"recorded base {name!r} is named like a {other.group(1)}-quantized base (not bitsandbytes)",
            four_bit=False,
        )
    return None


def from_config_json(path: Path) -> Evidence | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return _from_bnb_config(qc, "config.json", str(path)) if isinstance(qc, dict) else None


def from_model_card(path: Path) -> Evidence | None:
    """PEFT's model card section listing the bitsandbytes config used during training."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if CARD_PREFIX not in (line.strip() for line in lines):
        return None
    start = [line.strip() for line in lines].index(CARD_PREFIX) + 1
    values: dict[str, str] = {}
    for line in lines[start:]:
        match = CARD_LINE.match(line)
        if not match:
            if values:
                break
            continue
        values[match["key"]] = match["value"]
    return _from_bnb_config(values, "model card", str(path)) if values else None


def _flatten(data, prefix: str = "") -> dict:
    flat = {}
    if isinstance(data, dict):
        for key, value in data.items():
            flat.update(_flatten(value, f"{key}"))
    else:
        flat[prefix] = data
    return flat


def from_trainer_config(path: Path) -> Evidence | None:
    """axolotl YAML (`adapter: qlora`, `load_in_4bit`) or TRL model arguments (`load_in_4bit`,
    `bnb_4bit_quant_type`, `use_bnb_nested_quant`) in a config file beside the adapter."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yml", ".yaml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception:  # noqa: BLE001 - not a readable config: no evidence from it
        return None
    flat = _flatten(data) if isinstance(data, dict) else {}
    four = _bool(flat.get("load_in_4bit"))
    adapter = str(flat.get("adapter", "")).lower()
    if four is None and adapter != "qlora":
        return None
    four = True if adapter == "qlora" and four is None else four
    quant_type = str(flat.get("bnb_4bit_quant_type", "")).lower() or None
    double = _bool(flat.get("bnb_4bit_use_double_quant", flat.get("use_bnb_nested_quant")))
    parts = (
        [f"load_in_4bit={four}"]
        + ([f"adapter={adapter}"] if adapter else [])
        + ([f"bnb_4bit_quant_type={quant_type}"] if quant_type else [])
        + ([f"double quant={double}"] if double is not None else [])
    )
    return Evidence(
        "trainer config",
        str(path),
        ", ".join(parts),
        four_bit=bool(four),
        quant_type=quant_type if quant_type in ("nf4", "fp4") else None,
        double_quant=double,
    )


def adapter_evidence(adapter_dir: Path, adapter_config: dict) -> list[Evidence]:
    """Everything the adapter folder says about the base it was trained on."""
    adapter_dir = Path(adapter_dir)
    found: list[Evidence] = []
    name = adapter_config.get("base_model_name_or_path")
    if isinstance(name, str) and name:
        found.append(from_name(name, str(adapter_dir / "adapter_config.json")))
    found.append(from_config_json(adapter_dir / "config.json"))
    found.append(from_model_card(adapter_dir / "README.md"))
    for pattern in TRAINER_CONFIGS:
        for path in sorted(adapter_dir.glob(pattern)):
            found.append(from_trainer_config(path))
    return [e for e in found if e is not None]


def user_base_evidence(folder: Path, settings: QuantSettings | None, option: str) -> Evidence:
    detail = f"4-bit base given with {option}: {folder}"
    if settings is not None:
        return Evidence(
            "user",
            option,
            detail,
            quant_type=settings.quant_type,
            double_quant=settings.double_quant,
            blocksize=settings.blocksize,
        )
    return Evidence("user", option, detail)


# ------------------------------------------------------------------------------------------------- decision


def _agreed(values: list, what: str, warnings: list[str], evidence: list[Evidence]):
    distinct = sorted({v for v in values if v is not None}, key=str)
    if len(distinct) > 1:
        sources = "; ".join(f"{e.where}: {e.detail}" for e in evidence)
        warnings.append(f"QLoRA evidence disagrees on the {what} ({', '.join(map(str, distinct))}): {sources}")
        return None
    return distinct[0] if distinct else None


def decide(
    mode: str, evidence: list[Evidence], *, has_4bit_base: bool, blocksize: int = 64, double_quant: bool | None = None
) -> Decision:
    """The merge target from `--qlora MODE` and the evidence (see module doc)."""
    if mode not in MODES:
        raise MergeqError(f"--qlora {mode!r} is not one of {', '.join(MODES)}")
    four = [e for e in evidence if e.four_bit]
    against = [e for e in evidence if not e.four_bit]
    warnings: list[str] = []
    if has_4bit_base:
        return Decision(
            mode,
            True,
            None,
            "4-bit base given",
            evidence,
            warnings,
            "a bitsandbytes 4-bit base was given: it is the base the adapter was trained on",
        )
    if mode == "off":
        why = "--qlora off: merged into the base as given"
        if four:
            warnings.append(
                "--qlora off, but the adapter looks QLoRA-trained ("
                + "; ".join(e.detail for e in four)
                + "): the merge goes into the fp16 weights, not the 4-bit weights it was trained with"
            )
        return Decision(mode, bool(four), None, "fp16 base", evidence, warnings, why)
    if mode == "auto" and not four:
        why = "no evidence of a 4-bit training base" + (
            " (" + "; ".join(e.detail for e in against) + ")" if against else ""
        )
        return Decision(
            mode,
            False,
            None,
            "fp16 base",
            evidence,
            warnings,
            why + "; if it was trained with load_in_4bit, pass --qlora nf4 (or fp4)",
        )
    quant_types = [e.quant_type for e in four]
    quant_type = _agreed(quant_types, "quant type", warnings, four)
    if mode in ("nf4", "fp4"):
        if quant_type and quant_type != mode:
            warnings.append(f"--qlora {mode} overrides the evidence, which says {quant_type}")
        quant_type = mode
        why = f"--qlora {mode}"
    else:
        why = "QLoRA-trained: " + "; ".join(e.detail for e in four)
        if quant_type is None:
            conflict = any(q for q in quant_types)
            warnings.append(
                "the adapter looks QLoRA-trained but "
                + ("the evidence disagrees on" if conflict else "nothing says")
                + " whether the base was NF4 or FP4; rebuilding it as NF4 (the QLoRA recipe's choice and the "
                "usual trainer default). If it was FP4 pass --qlora fp4; to merge into the fp16 weights as they are, "
                "--qlora off"
            )
            quant_type = "nf4"
        if against:
            warnings.append("some evidence says otherwise: " + "; ".join(e.detail for e in against))
    if double_quant is None:
        double_quant = _agreed([e.double_quant for e in four], "double quantization", warnings, four)
        if double_quant is None:
            double_quant = True
            warnings.append(
                "nothing says whether the 4-bit base used double quantization; assuming it did "
                "(the QLoRA recipe); pass --no-double-quant if it did not (the difference is small: "
                "only the per-block scales change)"
            )
    settings = QuantSettings(quant_type, blocksize, double_quant)
    target = f"fp16 base requantized to {quant_type}" + (" (double quant)" if double_quant else "")
    return Decision(mode, True, settings, target, evidence, warnings, why)
