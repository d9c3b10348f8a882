"""The size and quality report that every artifact gets (report.json, report.md, a terminal table).

Schema version 1. Every exporter fills an ArtifactReport; the evaluator fills its `quality`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mergeq.atomic import write_json

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

    def to_json(self) -> dict:
        q = self.quality
        return {
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
            "perplexity_ratio": (q.perplexity / q.reference_perplexity) if q else None,
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

    def write(self, directory: Path) -> Path:
        """Write report.json into `directory` (report.md and the table come from the report writer)."""
        path = Path(directory) / "report.json"
        write_json(path, self.to_json())
        return path
