"""The QLoRA merge target chosen by measurement, before anything is written.

With both an fp16 base and the 4-bit base the adapter was trained on, two merges are possible: into the
fp16 weights, or into the dequantized 4-bit weights. Each candidate is scored against the trained model (the
4-bit base with the unmerged adapter, run by PEFT layer by layer, as merge/validate.py does) on windows of the
evaluation text, with the evaluator's own windows and metrics (mergeq/core/metrics.py). The candidates' weights
are computed by the merge itself (merge.source.Source), cast to the output dtype exactly as they would be
written, one decoder layer at a time (mergeq/core/streaming.py): nothing is written until the choice is made,
and then only the chosen checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge.unmerged import UnmergedWeights, with_adapters
from mergeq.core.errors import MergeqError
from mergeq.core.metrics import MetricSums, first_scored, log_probs, make_windows, tokenize
from mergeq.core.modelfiles import has_tokenizer, read_model_config
from mergeq.core.texts import load_text

log = logging.getLogger(__name__)

N_CTX = 512  # tokens per window (fewer when the model's context is shorter)
MAX_WINDOWS = 4


@dataclass
class TargetChoice:
    chosen: str
    candidates: dict[str, dict]  # label -> mean_kl, top1_agreement, perplexity
    reference: str
    text: dict  # mergeq.core.texts description of the text, with its token count
    scored_tokens: int
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "reference": self.reference,
            "candidates": self.candidates,
            "chosen": self.chosen,
            "why": "lowest mean KL to the trained model (4-bit base + unmerged adapter) on the evaluation text",
            "text": self.text,
            "scored_tokens": self.scored_tokens,
        }


class MergedWeights(UnmergedWeights):
    """A merge candidate's tensors as they would be written (merged in fp32, checked, cast to the output
    dtype), read back as fp32 for mergeq.core.streaming; computed one tensor at a time, never written."""

    def get(self, name: str) -> torch.Tensor:
        from merge.streaming import finalize

        return finalize(name, self.source.compute(name), self.source.out_dtype).to(torch.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.source.out_shapes.get(name) or self.source.shapes[name][1])

    def row_blocks(self, name: str):
        from mergeq.core.streaming import row_blocks

        if self.source.untouched(name):  # stored as it is: a block of rows at a time, cast as written
            for first, block in row_blocks(self.source.ckpt, name):
                yield first, block.to(self.source.out_dtype)
        else:
            yield 0, self.get(name)


def windows_of(text_path: Path, tokenizer_dirs: list[Path], vocab: int, max_positions: int | None):
    """The evaluator's windows over the evaluation text, with the first tokenizer that fits the vocabulary."""

    n_ctx = min(N_CTX, (max_positions or N_CTX) // 2 * 2)
    for folder in tokenizer_dirs:
        if not has_tokenizer(folder):
            continue
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        text = load_text(text_path, tokenizer=tokenizer, what="evaluation")
        ids, bos = tokenize(tokenizer, text.text)
        if ids and max(ids) >= vocab:
            continue
        windows = make_windows(ids, n_ctx, MAX_WINDOWS, bos, source=str(text_path))
        return windows, text.describe(len(ids)), str(folder)
    raise MergeqError(
        "choosing the QLoRA merge target needs a tokenizer for the evaluation text, and none of "
        + ", ".join(map(str, tokenizer_dirs))
        + " has one that fits the model's vocabulary",
        hint="put the tokenizer files in the adapter or base folder",
    )


def _streamed_model(weights, config: dict, hook=None):
    from mergeq.core.streaming import StreamedModel

    return StreamedModel(weights, config, torch.device("cpu"), hook)


def choose_target(sources: list, reference_source, text_path: Path, tokenizer_dirs: list[Path]) -> TargetChoice:
    """Score each candidate Source against `reference_source` (the 4-bit base, planned with the same
    adapters; run unmerged) on the evaluation text; the lowest mean KL wins (ties: the label's order)."""
    from mergeq.core import streaming

    config = read_model_config(reference_source.folder)
    why = streaming.unsupported_reason(config)
    if why is not None:
        raise MergeqError(
            f"choosing the QLoRA merge target by measurement runs the model one decoder layer at a time: {why}",
            hint="pass only one base: --qlora-base (the 4-bit base it was trained on) is the usual choice",
        )
    vocab = reference_source.out_shapes[f"{reference_source.info.input_embedding}.weight"][0]
    windows, text, tokenizer_dir = windows_of(text_path, tokenizer_dirs, vocab, config.get("max_position_embeddings"))
    positions = slice(first_scored(windows.n_ctx), windows.n_ctx - 1)
    reference = _streamed_model(
        UnmergedWeights(reference_source),
        config,
        hook=lambda index, layer: with_adapters(reference_source, reference.layer_prefix(index), layer),
    )
    ref_hidden = streaming.final_hidden(reference, windows.tokens, positions, progress="trained model, layer by layer")
    results: dict[str, dict] = {}
    for source in sources:
        candidate = _streamed_model(MergedWeights(source), config)
        hidden = streaming.final_hidden(candidate, windows.tokens, positions, progress=f"merge into {source.label}")
        sums = MetricSums()
        for (first, ref_logits), (_, logits) in zip(
            streaming.logits_blocks(reference, ref_hidden), streaming.logits_blocks(candidate, hidden)
        ):
            targets = windows.targets[first : first + logits.shape[0]].reshape(-1)
            sums.add(
                log_probs(ref_logits.reshape(-1, ref_logits.shape[-1])),
                log_probs(logits.reshape(-1, logits.shape[-1])),
                targets,
            )
        candidate.close()
        results[source.label] = {
            "mean_kl": float(f"{sums.kl_divergence:.6g}"),
            "top1_agreement": float(f"{sums.top1_agreement:.6g}"),
            "perplexity": float(f"{sums.perplexity:.6g}"),
        }
        reference_ppl = sums.reference_perplexity
    reference.close()
    chosen = min(results, key=lambda label: (results[label]["mean_kl"], [s.label for s in sources].index(label)))
    text["tokenizer"] = tokenizer_dir
    described = (
        f"the trained model: PEFT, unmerged adapter(s) on {reference_source.folder} "
        f"(dequantized 4-bit), layer by layer; perplexity {reference_ppl:.6g}"
    )
    log.info(
        "QLoRA merge target: %s (mean KL %s) vs %s",
        chosen,
        results[chosen]["mean_kl"],
        ", ".join(f"{k} {v['mean_kl']}" for k, v in results.items() if k != chosen),
    )
    return TargetChoice(chosen, results, described, text, windows.scored_tokens)
