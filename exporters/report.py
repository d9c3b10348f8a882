"""The size and quality report that every artifact gets: its types, report.json (schema version 1, documented in
docs/evaluation.md, checked by `validate_report_json`), and `measure_stage`, which records a stage's cost.

Every exporter fills an ArtifactReport's `size`; the evaluator fills its `quality` (exporters/evaluate.py).
report.md and the terminal table are rendered by exporters/report_text.py, the summary of a run that made several
artifacts (summary.json, summary.md, summary.png) by exporters/summary.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mergeq.core.atomic import write_json, write_text
from mergeq.core.errors import MergeqError
from mergeq.core.memory import peak_rss_bytes, reset_peak_rss

SCHEMA_VERSION = 1


@dataclass
class SizeInfo:
    size_bytes: int  # bytes on disk of the whole artifact
    fp16_bytes: int  # what the same model takes in fp16
    bits_per_weight: float  # over the whole artifact: 8 * size_bytes / total parameter count
    bits_per_quantized_weight: float | None  # over the quantized tensors only (None for fp16/bf16)
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count
    fallbacks: list[dict] = field(default_factory=list)  # {"tensor", "wanted", "got", "why"}

    @property
    def ratio_to_fp16(self) -> float:
        return self.size_bytes / self.fp16_bytes if self.fp16_bytes else float("nan")


@dataclass
class QualityInfo:
    perplexity: float
    reference_perplexity: float
    kl_divergence: float  # mean KL(reference || artifact) over scored tokens, nats
    top1_agreement: float  # fraction of scored tokens where both argmaxes agree
    eval_tokens: int  # scored tokens
    text_sha256: str
    context_length: int
    evaluator: str  # "torch" or "llama.cpp"
    windows: int = 0  # windows of context_length tokens scored
    text_tokens: int = 0  # tokens in the whole evaluation text (reference tokenizer, with BOS if it adds one)

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity


@dataclass
class StageCost:
    seconds: float
    peak_rss_bytes: int


@dataclass
class ArtifactReport:
    format: str  # "hf", "gguf", "awq", "gptq"
    quant: str  # "f16", "Q4_K_M", "w4g64-sym", ...
    path: str
    size: SizeInfo
    quality: QualityInfo | None = None
    stages: dict[str, StageCost] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # input hashes, options, tool versions
    warnings: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # format-specific facts (e.g. predicted vLLM kernel)

    @property
    def label(self) -> str:
        return f"{self.format} {self.quant}"

    def to_json(self) -> dict:
        q = self.quality
        data = {
            "schema_version": SCHEMA_VERSION,
            "format": self.format,
            "quant": self.quant,
            "path": self.path,
            "size_bytes": self.size.size_bytes,
            "fp16_bytes": self.size.fp16_bytes,
            "ratio_to_fp16": self.size.ratio_to_fp16,
            "bits_per_weight": self.size.bits_per_weight,
            "bits_per_quantized_weight": self.size.bits_per_quantized_weight,
            "tensor_types": self.size.tensor_types,
            "fallbacks": self.size.fallbacks,
            "perplexity": q.perplexity if q else None,
            "reference_perplexity": q.reference_perplexity if q else None,
            "perplexity_ratio": q.perplexity_ratio if q else None,
            "kl_divergence": q.kl_divergence if q else None,
            "top1_agreement": q.top1_agreement if q else None,
            "eval_tokens": q.eval_tokens if q else None,
            "eval": dataclasses.asdict(q) if q else None,
            "seconds": {name: cost.seconds for name, cost in self.stages.items()},
            "peak_rss_bytes": {name: cost.peak_rss_bytes for name, cost in self.stages.items()},
            "provenance": self.provenance,
            "warnings": self.warnings,
            "extra": self.extra,
        }
        return json_safe(data)

    @classmethod
    def from_json(cls, data: dict) -> ArtifactReport:
        validate_report_json(data)
        size = SizeInfo(
            size_bytes=data["size_bytes"],
            fp16_bytes=data["fp16_bytes"],
            bits_per_weight=data["bits_per_weight"],
            bits_per_quantized_weight=data["bits_per_quantized_weight"],
            tensor_types=dict(data["tensor_types"]),
            fallbacks=list(data["fallbacks"]),
        )
        quality = None
        if data.get("eval"):
            names = {f.name for f in dataclasses.fields(QualityInfo)}
            quality = QualityInfo(**{k: v for k, v in data["eval"].items() if k in names})
        stages = {
            name: StageCost(seconds, data["peak_rss_bytes"].get(name, 0)) for name, seconds in data["seconds"].items()
        }
        return cls(
            format=data["format"],
            quant=data["quant"],
            path=data["path"],
            size=size,
            quality=quality,
            stages=stages,
            provenance=dict(data["provenance"]),
            warnings=list(data["warnings"]),
            extra=dict(data.get("extra") or {}),
        )

    def write(self, directory: Path) -> Path:
        """Write report.json and report.md into `directory`; return the report.json path."""
        path = Path(directory) / "report.json"
        data = self.to_json()
        validate_report_json(data)
        write_json(path, data)
        from exporters.report_text import report_markdown  # report_text imports this module

        write_text(Path(directory) / "report.md", report_markdown(self))
        return path


def load_report(path: Path) -> ArtifactReport:
    """Read a report.json (any file written by ArtifactReport.write), validating its schema."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MergeqError(f"cannot read report {path}: {err}", hint="re-run the export that wrote it") from err
    try:
        return ArtifactReport.from_json(data)
    except MergeqError as err:
        raise MergeqError(f"report {path}: {err}", hint=err.hint) from err


def json_safe(value):
    """JSON has no NaN or Infinity: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- cost


class StageMeter:
    """What `measure_stage` yields: child processes' peaks (measured by whoever ran them) go in here."""

    def __init__(self):
        self.child_peak = 0

    def child(self, peak_rss_bytes: int) -> None:
        self.child_peak = max(self.child_peak, peak_rss_bytes)


@contextlib.contextmanager
def measure_stage(report: ArtifactReport, name: str) -> Iterator[StageMeter]:
    """Add the wall seconds and the peak RSS of the enclosed block to `report.stages[name]`.

    Peak RSS is this process's high-water mark during the block (reset at its start where Linux allows,
    mergeq.core.memory) or the largest child peak handed to the meter, whichever is larger. Seconds of repeated
    stages add up; their peak is the larger one.
    """
    reset_peak_rss()
    meter = StageMeter()
    started = time.perf_counter()
    yield meter
    seconds = time.perf_counter() - started
    before = report.stages.get(name)
    report.stages[name] = StageCost(
        seconds=seconds + (before.seconds if before else 0.0),
        peak_rss_bytes=max(peak_rss_bytes(), meter.child_peak, before.peak_rss_bytes if before else 0),
    )


# ------------------------------------------------------------------------------------------- schema

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))

# key -> accepted Python types of its JSON value (the schema version 1 of report.json)
REPORT_FIELDS: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "format": (str,),
    "quant": (str,),
    "path": (str,),
    "size_bytes": (int,),
    "fp16_bytes": (int,),
    "ratio_to_fp16": _OPT_NUM,
    "bits_per_weight": _OPT_NUM,
    "bits_per_quantized_weight": _OPT_NUM,
    "tensor_types": (dict,),
    "fallbacks": (list,),
    "perplexity": _OPT_NUM,
    "reference_perplexity": _OPT_NUM,
    "perplexity_ratio": _OPT_NUM,
    "kl_divergence": _OPT_NUM,
    "top1_agreement": _OPT_NUM,
    "eval_tokens": _OPT_INT,
    "eval": (dict, type(None)),
    "seconds": (dict,),
    "peak_rss_bytes": (dict,),
    "provenance": (dict,),
    "warnings": (list,),
    "extra": (dict,),
}
EVAL_FIELDS: dict[str, tuple[type, ...]] = {
    "perplexity": _NUM,
    "reference_perplexity": _NUM,
    "kl_divergence": _NUM,
    "top1_agreement": _NUM,
    "eval_tokens": (int,),
    "text_sha256": (str,),
    "context_length": (int,),
    "evaluator": (str,),
    "windows": (int,),
    "text_tokens": (int,),
}
QUALITY_KEYS = (
    "perplexity",
    "reference_perplexity",
    "perplexity_ratio",
    "kl_divergence",
    "top1_agreement",
    "eval_tokens",
)


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "integer", float: "number", str: "string", dict: "object", list: "array", type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _check(data: dict, fields: dict[str, tuple[type, ...]], where: str, problems: list[str]) -> None:
    for key, types in fields.items():
        if key not in data:
            problems.append(f"{where}{key}: missing")
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            problems.append(f"{where}{key}: expected {_type_names(types)}, got {type(value).__name__}")


def validate_report_json(data: dict) -> None:
    """Check a report.json object against schema version 1; raise MergeqError listing every problem."""
    if not isinstance(data, dict):
        raise MergeqError("a report must be a JSON object", hint="see docs/evaluation.md for the schema")
    problems: list[str] = []
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MergeqError(
            f"report schema_version is {version!r}, this mergeq reads {SCHEMA_VERSION}",
            hint="re-run the export with this version of mergeq",
        )
    _check(data, REPORT_FIELDS, "", problems)
    if not problems:
        if data["size_bytes"] < 0 or data["fp16_bytes"] < 0:
            problems.append("size_bytes and fp16_bytes must not be negative")
        for name, value in data["tensor_types"].items():
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"tensor_types.{name}: expected integer")
        for key in ("seconds", "peak_rss_bytes"):
            for name, value in data[key].items():
                if not isinstance(value, _NUM) or isinstance(value, bool):
                    problems.append(f"{key}.{name}: expected number")
        if not all(isinstance(w, str) for w in data["warnings"]):
            problems.append("warnings: expected an array of strings")
        if data["eval"] is None:
            problems += [f"{k}: must be null without eval" for k in QUALITY_KEYS if data[k] is not None]
        else:
            _check(data["eval"], EVAL_FIELDS, "eval.", problems)
            if not problems:
                problems += [
                    f"{k}: disagrees with eval.{k}"
                    for k in QUALITY_KEYS
                    if k in data["eval"] and data[k] != data["eval"][k]
                ]
                top1 = data["top1_agreement"]
                if top1 is not None and not 0.0 <= top1 <= 1.0:
                    problems.append("top1_agreement: must lie in [0, 1]")
    if problems:
        raise MergeqError(
            "report does not match schema version 1: " + "; ".join(problems),
            hint="see docs/evaluation.md for the schema",
        )
