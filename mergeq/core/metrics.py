"""The quality metrics, one definition for every format: windows, scored positions, perplexity, KL, top-1.

Everything here is plain math on token ids and log-probabilities (and the tokenization that gives the ids);
loading models and running llama.cpp live in exporters/eval_torch.py and exporters/eval_gguf.py. merge/target.py
scores merge candidates with the same windows and metrics. The windowing mirrors llama.cpp's `llama-perplexity` exactly:

- the text loses one trailing newline (llama.cpp's `-f` does that) and is tokenized once, with the
  tokenizer's own BOS if it adds one;
- windows are consecutive, non-overlapping slices of `n_ctx` tokens; a partial last window is dropped;
- each window's first token is replaced by BOS when the tokenizer adds BOS;
- in each window, the logits at positions `n_ctx // 2 .. n_ctx - 2` are scored against the next token,
  so a window scores `n_ctx - 1 - n_ctx // 2` tokens (255 for n_ctx 512).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergeq.core.errors import MergeqError


def first_scored(n_ctx: int) -> int:
    """Position of the first logit that is scored in a window."""
    return n_ctx // 2


def scored_per_window(n_ctx: int) -> int:
    return n_ctx - 1 - first_scored(n_ctx)


@dataclass(frozen=True)
class Windows:
    """The evaluation windows: `tokens[i]` is window i as fed to the model (BOS already in place)."""

    tokens: torch.Tensor  # int64 [n_windows, n_ctx]
    targets: torch.Tensor  # int64 [n_windows, scored_per_window]: the tokens that the scored logits predict
    n_ctx: int
    text_tokens: int  # tokens in the whole text (with BOS if added)
    bos_id: int | None = None  # the BOS that replaced each window's first token (None: no BOS)

    @property
    def n_windows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def scored_tokens(self) -> int:
        return int(self.targets.numel())


def make_windows(ids: list[int], n_ctx: int, max_windows: int, bos_id: int | None, *, source: str = "text") -> Windows:
    """Split token ids into llama-perplexity's windows. `bos_id` is None when the tokenizer adds no BOS."""
    if n_ctx < 4 or n_ctx % 2:
        raise MergeqError(f"context length {n_ctx} is not usable", hint="use an even n_ctx of at least 4, e.g. 512")
    available = len(ids) // n_ctx
    if len(ids) < 2 * n_ctx:
        raise MergeqError(
            f"evaluation text {source} is too short: {len(ids)} tokens make fewer than two windows of {n_ctx} tokens",
            hint=f"give an evaluation text of at least {2 * n_ctx} tokens (about {8 * n_ctx} characters of prose)",
        )
    n_windows = min(available, max_windows)
    tokens = torch.tensor(ids[: n_windows * n_ctx], dtype=torch.int64).view(n_windows, n_ctx).clone()
    first = first_scored(n_ctx)
    targets = tokens[:, first + 1 :].clone()  # before the BOS replacement: position 0 is never a target
    if bos_id is not None:
        tokens[:, 0] = bos_id
    return Windows(tokens=tokens, targets=targets, n_ctx=n_ctx, text_tokens=len(ids), bos_id=bos_id)


@dataclass
class MetricSums:
    """Running sums over scored tokens; accumulate window by window, read the metrics at the end."""

    nll: float = 0.0  # artifact negative log-likelihood, nats
    reference_nll: float = 0.0
    kl: float = 0.0  # sum over tokens of KL(P_ref || P_artifact), nats
    top1_same: int = 0
    count: int = 0

    def add(self, reference_logprobs: torch.Tensor, artifact_logprobs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add scored positions: log-probabilities [T, V] over the full vocabulary, targets [T]."""
        nll, ref_nll, kl, same = token_metrics(reference_logprobs, artifact_logprobs, targets)
        self.nll += float(nll.sum())
        self.reference_nll += float(ref_nll.sum())
        self.kl += float(kl.sum())
        self.top1_same += int(same.sum())
        self.count += int(targets.numel())

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.count)

    @property
    def reference_perplexity(self) -> float:
        return math.exp(self.reference_nll / self.count)

    @property
    def kl_divergence(self) -> float:
        return self.kl / self.count

    @property
    def top1_agreement(self) -> float:
        return self.top1_same / self.count


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities, whatever the logits' dtype."""
    return torch.log_softmax(logits.to(torch.float32), dim=-1)


def token_metrics(reference_logprobs: torch.Tensor, artifact_logprobs: torch.Tensor, targets: torch.Tensor):
    """Per scored token: artifact NLL, reference NLL, KL(P_ref || P_art) over the full vocabulary, same argmax.

    Inputs are log-probabilities [T, V]. Element-wise work is fp32 (the reference is stored in fp32); every
    sum over the vocabulary and the per-token results are float64.
    """
    if reference_logprobs.shape != artifact_logprobs.shape:
        raise MergeqError(
            f"reference and artifact disagree on the vocabulary: {tuple(reference_logprobs.shape)} vs "
            f"{tuple(artifact_logprobs.shape)} log-probabilities",
            hint="evaluate an artifact against the checkpoint it was exported from",
        )
    ref = reference_logprobs.to(torch.float32)
    art = artifact_logprobs.to(torch.float32)
    idx = targets.view(-1, 1)
    nll = -art.gather(1, idx).squeeze(1).to(torch.float64)
    ref_nll = -ref.gather(1, idx).squeeze(1).to(torch.float64)
    p = ref.exp()
    terms = p * (ref - art)
    if bool(torch.isinf(ref).any()):
        # 0 * log 0 is 0: a token the reference gives probability 0 adds nothing, whatever the artifact says
        terms = torch.where(p > 0, terms, torch.zeros_like(terms))
    kl = terms.sum(dim=1, dtype=torch.float64)
    same = ref.argmax(dim=1) == art.argmax(dim=1)  # first maximal index on ties, as llama.cpp does
    return nll, ref_nll, kl, same


def check_finite(values: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise MergeqError(
            f"{what} gives {bad} non-finite logits (NaN or Inf)",
            hint="the weights are corrupted or overflow their dtype; re-export the artifact",
        )


def bos_if_added(tokenizer) -> int | None:
    """The BOS id when the tokenizer prepends BOS (what llama.cpp's add_bos means), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if len(special) > len(plain) and special[0] == bos else None


def tokenize(tokenizer, text: str) -> tuple[list[int], int | None]:
    """Token ids of the whole text as llama-perplexity makes them: BOS (if added), then the text."""
    bos = bos_if_added(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return ([bos] if bos is not None else []) + ids, bos
