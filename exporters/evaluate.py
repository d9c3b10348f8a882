"""The evaluator: perplexity, KL divergence and top-1 agreement of any artifact against its fp16 reference.

One definition for every format (see mergeq/core/metrics.py and docs/evaluation.md). The artifact is
evaluated as written on disk:

- Hugging Face fp16/bf16/fp32 directories: transformers loads the files, computation in fp32;
- AWQ / GPTQ / compressed-tensors directories: our own unpacking (`exporters.int4.formats`) into an fp32
  model of the architecture in the artifact's config;
- GGUF files: llama.cpp's `llama-perplexity` in its KL-divergence mode, fed the reference's windows and
  log-probabilities in its own file format, so llama.cpp scores the GGUF on exactly the same tokens and
  positions as every other format.

The reference (always a Hugging Face checkpoint, run by torch in fp32) is computed once per
(reference files, tokens, context) and cached as full-vocabulary fp32 log-probabilities of the scored
positions under `cache_root()/eval/`.

This module ties them together; each part has its own: the inputs (exporters/eval_inputs.py), torch's
log-probabilities (exporters/eval_torch.py), the reference cache (exporters/eval_reference.py) and the GGUF
side (exporters/eval_gguf.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from exporters import eval_torch
from exporters.eval_gguf import check_tokenization, evaluate_gguf
from exporters.eval_inputs import check_checkpoint, detect_format, load_text, load_tokenizer
from exporters.eval_options import EvalOptions
from exporters.eval_reference import checkpoint_fingerprint, reference_logprobs
from exporters.report import ArtifactReport, QualityInfo, measure_stage
from mergeq.core.errors import MergeqError
from mergeq.core.metrics import MetricSums, Windows, make_windows, tokenize
from mergeq.core.versions import package_versions

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    quality: QualityInfo
    warnings: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    tool_peak_rss_bytes: int = 0  # the llama.cpp child's peak (GGUF), counted in the stage's cost


def evaluate(artifact: Path, reference: Path, text: Path | None, settings: EvalOptions | None = None) -> QualityInfo:
    """Quality of `artifact` against `reference` on `text` (a path; see load_text)."""
    result = evaluate_full(artifact, reference, text, settings)
    for warning in result.warnings:
        log.warning("%s", warning)
    return result.quality


def evaluate_into_report(
    report: ArtifactReport, reference: Path, text: Path | None, settings: EvalOptions | None = None
) -> None:
    """Fill report.quality, add the cost to report.stages["eval"], record provenance and warnings."""
    with measure_stage(report, "eval") as stage:
        result = evaluate_full(Path(report.path), Path(reference), text, settings)
        stage.child(result.tool_peak_rss_bytes)
    report.quality = result.quality
    report.provenance["eval"] = result.provenance
    for warning in result.warnings:
        log.warning("%s: %s", report.path, warning)
        if warning not in report.warnings:
            report.warnings.append(warning)


def evaluate_full(
    artifact: Path, reference: Path, text: Path | None, settings: EvalOptions | None = None
) -> EvalResult:
    options = settings or EvalOptions()
    artifact, reference = Path(artifact), Path(reference)
    if not reference.is_dir():
        raise MergeqError(
            f"reference {reference} is not a checkpoint directory",
            hint="the reference is the merged fp16/bf16 Hugging Face checkpoint",
        )
    if detect_format(reference) != "hf":
        raise MergeqError(
            f"reference {reference} is a quantized checkpoint", hint="compare against the merged fp16/bf16 checkpoint"
        )
    check_checkpoint(reference)
    kind = detect_format(artifact)
    tokenizer = load_tokenizer(reference)
    eval_text = load_text(text, tokenizer)
    ids, bos = tokenize(tokenizer, eval_text.text)
    windows = make_windows(ids, options.n_ctx, options.max_windows, bos, source=str(eval_text.path))
    warnings: list[str] = []
    provenance = {
        "text": str(eval_text.path),
        "text_sha256": eval_text.sha256,
        "reference": str(reference),
        "reference_sha256": checkpoint_fingerprint(reference),
        "n_ctx": windows.n_ctx,
        "windows": windows.n_windows,
        "text_tokens": windows.text_tokens,
        "versions": package_versions(("torch", "transformers")),
        "text_source": eval_text.describe(windows.text_tokens),
    }
    tool_peak = 0
    if kind == "gguf":
        stats, sums = evaluate_gguf(artifact, reference, windows, options, provenance)
        tool_peak = stats["peak_rss_bytes"]
        check_tokenization(artifact, tokenizer, eval_text, windows, options, warnings)
        quality = QualityInfo(
            perplexity=stats["perplexity"],
            reference_perplexity=sums.reference_perplexity,
            kl_divergence=stats["kl_divergence"],
            top1_agreement=stats["top1_percent"] / 100,
            eval_tokens=windows.scored_tokens,
            text_sha256=eval_text.sha256,
            context_length=windows.n_ctx,
            evaluator="llama.cpp",
            windows=windows.n_windows,
            text_tokens=windows.text_tokens,
        )
    else:
        sums = _evaluate_torch(artifact, kind, reference, windows, options)
        quality = QualityInfo(
            perplexity=sums.perplexity,
            reference_perplexity=sums.reference_perplexity,
            kl_divergence=sums.kl_divergence,
            top1_agreement=sums.top1_agreement,
            eval_tokens=sums.count,
            text_sha256=eval_text.sha256,
            context_length=windows.n_ctx,
            evaluator="torch",
            windows=windows.n_windows,
            text_tokens=windows.text_tokens,
        )
    for name, value in (("perplexity", quality.perplexity), ("KL divergence", quality.kl_divergence)):
        if not math.isfinite(value):
            raise MergeqError(
                f"{artifact} gives a non-finite {name} ({value})",
                hint="the artifact's weights are damaged or overflow; export it again",
            )
    return EvalResult(quality, warnings, provenance, tool_peak)


def _evaluate_torch(artifact: Path, kind: str, reference: Path, windows: Windows, options: EvalOptions) -> MetricSums:
    ref = reference_logprobs(reference, windows, options)
    sums = MetricSums()
    if kind == "hf" and artifact.resolve() == reference.resolve():
        for i in range(windows.n_windows):
            lp = ref.window(i)
            sums.add(lp, lp, windows.targets[i])
        return sums
    for i, lp in eval_torch.model_logprobs(artifact, kind, windows, options, artifact.name):
        sums.add(ref.window(i), lp, windows.targets[i])
    return sums
