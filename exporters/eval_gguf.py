"""A GGUF scored by llama.cpp's `llama-perplexity` in its KL-divergence mode, fed the reference's windows and
log-probabilities in its own `--kl-divergence-base` file format, so llama.cpp scores the GGUF on exactly the
same tokens and positions as every other format; and a check that llama.cpp tokenizes the text as the
reference does."""

from __future__ import annotations

import logging
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from exporters.eval_inputs import EvalText
from exporters.eval_options import EvalOptions
from exporters.eval_reference import ReferenceLogprobs, reference_logprobs
from mergeq.core.atomic import atomic_file
from mergeq.core.errors import MergeqError, ToolError
from mergeq.core.locks import exclusive
from mergeq.core.memory import LLAMA_LOGITS_BUDGET_BYTES
from mergeq.core.metrics import MetricSums, Windows

log = logging.getLogger(__name__)

LLAMA_LOGITS_MAGIC = b"_logits_"
LLAMA_BAND_NATS = 16.0  # llama-perplexity stores log-probs within 16 nats of the top token, 16 bits each


def check_gguf(path: Path):
    """Read a GGUF's header and tensor list with the pinned gguf-py (a damaged file raises naming it)."""
    from exporters.gguf_inspect import read_gguf

    return read_gguf(Path(path))


def write_llama_base(path: Path, reference: ReferenceLogprobs, windows: Windows) -> None:
    """The reference as llama-perplexity's `--kl-divergence-base` file: our tokens and 16-bit log-probabilities.

    Layout (little-endian): "_logits_", n_ctx, n_vocab, n_chunk (int32), the windows' tokens (int32), then for
    every scored position a row of 2 + (n_vocab rounded up to even) + 2 uint16: the fp32 scale and minimum,
    then round((logprob - minimum) / scale), where minimum = max(lowest log-prob, top log-prob - 16) and
    scale = (top - minimum) / 65535 (0 for tokens at or below the minimum). llama.cpp evaluates exactly these
    tokens, so the GGUF is scored on the reference tokenizer's windows whatever its own tokenizer does.
    """
    first = reference.window(0)
    n_vocab = int(first.shape[-1])
    row = 2 * ((n_vocab + 1) // 2) + 4
    with atomic_file(path, "wb") as handle:
        handle.write(LLAMA_LOGITS_MAGIC + struct.pack("<iii", windows.n_ctx, n_vocab, windows.n_windows))
        handle.write(windows.tokens.to(torch.int32).numpy().astype("<i4").tobytes())
        for i in range(windows.n_windows):
            handle.write(quantize_logprobs(reference.window(i), row).tobytes())


def quantize_logprobs(lp: torch.Tensor, row: int) -> np.ndarray:
    """llama.cpp's rows (uint16 [T, row]) of fp32 log-probabilities [T, V]."""
    lp = lp.to(torch.float32)
    top = lp.max(dim=1, keepdim=True).values
    low = torch.maximum(lp.min(dim=1, keepdim=True).values, top - LLAMA_BAND_NATS)
    scale = (top - low) / 65535
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(lp > low, torch.round((lp - low) / safe), torch.zeros_like(lp)).clamp_(0, 65535)
    out = np.zeros((lp.shape[0], row), dtype="<u2")
    out[:, :4] = torch.cat([scale, low], dim=1).numpy().astype("<f4").view("<u2")
    out[:, 4 : 4 + lp.shape[1]] = q.to(torch.int32).numpy().astype("<u2")
    return out


_KL_PATTERNS = {
    "perplexity": re.compile(r"Mean PPL\(Q\)\s*:\s*(-?nan|-?inf|[-+0-9.eE]+)"),
    "reference_perplexity": re.compile(r"Mean PPL\(base\)\s*:\s*(-?nan|-?inf|[-+0-9.eE]+)"),
    "kl_divergence": re.compile(r"Mean\s+KLD:\s*(-?nan|-?inf|[-+0-9.eE]+)"),
    "top1_percent": re.compile(r"Same top p:\s*(-?nan|-?inf|[-+0-9.eE]+)"),
    "chunks": re.compile(r"computing over (\d+) chunks, n_ctx=(\d+)"),
}


def parse_kl_output(output: str) -> dict[str, float]:
    """The final statistics of `llama-perplexity --kl-divergence` from its log."""
    found: dict[str, float] = {}
    for key, pattern in _KL_PATTERNS.items():
        matches = pattern.findall(output)
        if not matches:
            raise ToolError(
                f"llama-perplexity printed no {key.replace('_', ' ')}",
                hint="its output format changed or the run stopped early; rerun with -v",
            )
        last = matches[-1]
        if key == "chunks":
            found["chunks"], found["n_ctx"] = float(last[0]), float(last[1])
        else:
            found[key] = float(last)
    return found


def run_kl_divergence(command, artifact: Path, attempts: int = 3):
    """Run `llama-perplexity --kl-divergence` and parse its statistics; returns (stats, tool result).

    llama-perplexity can exit 0 without (all of) its statistics: its KL pass stops early on "failed to decode"
    or a base file it cannot read, and the pinned common/log.cpp logs from a thread and never flushes it at
    exit (it leaks the logger on purpose, llama.cpp issue 22142), so on a loaded machine the last lines can be
    lost. It runs again, up to `attempts` times, with a warning, then fails quoting its last output lines."""
    from exporters.llamacpp.run import quoted_tail, run_tool

    for attempt in range(1, attempts + 1):
        result = run_tool(command, hint=f"if {artifact} is damaged, export it again", again=attempt > 1)
        try:
            return parse_kl_output(result.stdout + "\n" + result.stderr), result
        except ToolError as err:
            quoted = quoted_tail(result, 12)
            if attempt == attempts:
                raise ToolError(f"{err.args[0]}; its last output lines:\n{quoted}", hint=err.hint) from None
            log.warning(
                "llama-perplexity exited 0 without statistics on %s; running it once more. Its last output lines:\n%s",
                artifact,
                quoted,
            )
    raise AssertionError("unreachable")


_TOKEN_COUNT = re.compile(r"tokenizes to only (\d+) tokens")


def llama_token_count(gguf: Path, text: str, n_ctx_probe: int, options: EvalOptions) -> int | None:
    """How many tokens llama.cpp makes of `text` (with its BOS), from llama-perplexity's too-short message.

    With a context of `n_ctx_probe` >= half the text's tokens, llama-perplexity only loads the model,
    tokenizes, prints the count and stops. None when it never printed the count (three runs).
    """
    from exporters.llamacpp.build import tool_command
    from exporters.llamacpp.run import EVAL_WEIGHT_FLAGS, run_tool

    with tempfile.TemporaryDirectory(prefix="mergeq-eval-") as tmp:
        probe = Path(tmp) / "prefix.txt"
        probe.write_text(text + "\n", encoding="utf-8")  # llama.cpp drops one trailing newline
        command = tool_command(
            "llama-perplexity",
            "-m",
            gguf,
            "-f",
            probe,
            "-c",
            n_ctx_probe,
            "-b",
            min(2048, n_ctx_probe),
            "-t",
            options.threads or os.cpu_count() or 1,
            *EVAL_WEIGHT_FLAGS,
        )
        for attempt in range(3):  # its last log lines can be lost at exit (run_kl_divergence): ask again
            result = run_tool(command, hint=f"if {gguf} is damaged, export it again", again=attempt > 0)
            if found := _TOKEN_COUNT.findall(result.stdout + result.stderr):
                return int(found[-1])
    return None


def llama_version() -> dict:
    from exporters.llamacpp.pin import version_info

    return version_info()


def parallel_windows(n_ctx: int, n_vocab: int) -> int:
    """How many windows llama-perplexity scores in one batch: up to 2048 tokens, fewer where the batch's logits
    would pass LLAMA_LOGITS_BUDGET_BYTES (a 128k vocabulary: one window of 512 tokens holds 0.25 GiB of
    logits). Same results, less memory."""
    return max(1, min(2048 // n_ctx, LLAMA_LOGITS_BUDGET_BYTES // (n_ctx * n_vocab * 4)))


def evaluate_gguf(artifact: Path, reference: Path, windows: Windows, options: EvalOptions, provenance: dict):
    """llama-perplexity in KL-divergence mode against the cached reference: our windows, llama.cpp's logits."""
    from exporters.llamacpp.build import tool_command
    from exporters.llamacpp.run import EVAL_WEIGHT_FLAGS, EVAL_WEIGHTS

    if windows.scored_tokens < 100:
        raise MergeqError(
            f"evaluating a GGUF needs at least 100 scored tokens; these windows score {windows.scored_tokens}",
            hint="use a longer evaluation text or a larger n_ctx (llama-perplexity prints no "
            "statistics below 100 tokens)",
        )
    summary = check_gguf(artifact)
    ref = reference_logprobs(reference, windows, options)
    n_vocab = int(ref.window(0).shape[-1])
    gguf_vocab = summary.array_lengths.get("tokenizer.ggml.tokens")
    if gguf_vocab is not None and gguf_vocab != n_vocab:
        raise MergeqError(
            f"{artifact} has a vocabulary of {gguf_vocab} tokens, the reference {reference} {n_vocab}",
            hint="evaluate the GGUF against the checkpoint it was converted from",
        )
    base = ref.directory / "llama-base.bin"
    with exclusive(ref.directory.parent / f"{ref.directory.name}.lock", "waiting for the reference cache"):
        if not base.is_file():
            write_llama_base(base, ref, windows)
    threads = options.threads or os.cpu_count() or 1
    n_ctx = windows.n_ctx
    batch = parallel_windows(n_ctx, n_vocab)
    provenance["llama_weights"] = EVAL_WEIGHTS
    command = tool_command(
        "llama-perplexity",
        "-m",
        artifact,
        "--kl-divergence",
        "--kl-divergence-base",
        base,
        "-c",
        n_ctx,
        "-b",
        n_ctx * batch,
        "-t",
        threads,
        *EVAL_WEIGHT_FLAGS,
    )
    log.info("running %s", " ".join(command.argv))
    stats, result = run_kl_divergence(command, artifact)
    stats["peak_rss_bytes"] = result.peak_rss_bytes
    # what llama-perplexity held of its own at most; the rest of its peak was the GGUF's mapped pages
    provenance["llama_perplexity_peak_anonymous_bytes"] = result.peak_anon_bytes
    provenance["llama.cpp"] = llama_version()
    if (int(stats["chunks"]), int(stats["n_ctx"])) != (windows.n_windows, n_ctx):
        raise ToolError(
            f"llama-perplexity on {artifact} evaluated {int(stats['chunks'])} windows of "
            f"{int(stats['n_ctx'])} tokens, mergeq asked for {windows.n_windows} of {n_ctx}"
        )
    sums = MetricSums()  # the reference's own numbers, exact, from the cache
    for i in range(windows.n_windows):
        lp = ref.window(i)
        sums.add(lp, lp, windows.targets[i])
    if abs(stats["reference_perplexity"] / sums.reference_perplexity - 1) > 1e-3:
        raise ToolError(
            f"llama-perplexity read the reference perplexity as {stats['reference_perplexity']:.4f}, "
            f"mergeq computed {sums.reference_perplexity:.4f}",
            hint=f"the reference cache may be damaged; remove {ref.directory} and rerun",
        )
    return stats, sums


def check_tokenization(
    artifact: Path, tokenizer, eval_text: EvalText, windows: Windows, options: EvalOptions, warnings: list[str]
) -> None:
    """Warn when llama.cpp would tokenize the evaluated text into another number of tokens than the reference."""
    prefix, hf_count = eval_text_prefix(tokenizer, eval_text, windows)
    count = llama_token_count(artifact, prefix, hf_count, options)
    if count is None:
        warnings.append("could not read llama.cpp's token count of the evaluation text")
    elif count != hf_count:
        warnings.append(
            f"llama.cpp tokenizes the evaluated text into {count} tokens, the reference tokenizer into {hf_count}: "
            "in llama.cpp this model sees other tokens for the same text than in transformers. The scores here "
            "use the reference tokenizer's tokens for every format, so they stay comparable"
        )


def eval_text_prefix(tokenizer, eval_text: EvalText, windows: Windows) -> tuple[str, int]:
    """The text the evaluated windows cover, and its token count with the reference tokenizer (with BOS)."""
    encoding = tokenizer(eval_text.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    bos = 1 if windows.bos_id is not None else 0
    used = windows.n_windows * windows.n_ctx - bos  # text tokens inside the windows
    end = encoding["offset_mapping"][used - 1][1]
    prefix = eval_text.text[:end]
    count = len(tokenizer(prefix, add_special_tokens=False, verbose=False)["input_ids"]) + bos
    return prefix, count
