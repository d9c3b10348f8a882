"""Calibration data: a text in any format mergeq.core.texts reads -> N samples of L tokens, with where it came from.

The text (chat conversations rendered through the model's chat template) is tokenized as one stream;
samples are non-overlapping windows of L tokens spread evenly over it, so the same file, tokenizer and (N, L)
give the same samples. The report names the file, its sha256, format, sample count, token count and rendering.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergeq.core.errors import MergeqError
from mergeq.core.texts import LoadedText, load_text

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    tokens: torch.Tensor  # [samples, seq_len] int64
    source: str  # the file the text came from
    sha256: str  # of the file's bytes
    text_tokens: int  # tokens in the whole text
    requested_samples: int
    warnings: list[str] = field(default_factory=list)
    text: LoadedText | None = None  # format, samples in the file, rendering

    @property
    def samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def describe(self) -> dict:
        return {
            "calib_file": self.source,
            "calib_sha256": self.sha256,
            "calib_samples": self.samples,
            "calib_seq_len": self.seq_len,
            "calib_text_tokens": self.text_tokens,
            "calib_format": self.text.format if self.text else None,
            "calib_file_samples": self.text.samples if self.text else None,
            "calib_rendering": self.text.rendering if self.text else None,
        }


def load_calibration(path: Path, tokenizer, samples: int, seq_len: int) -> Calibration:
    if samples < 1 or seq_len < 2:
        raise MergeqError(f"--samples {samples} --seq-len {seq_len}: need at least 1 sample of 2 tokens")
    loaded = load_text(path, tokenizer=tokenizer, what="calibration")
    text = loaded.text
    if not text.strip():
        raise MergeqError(f"calibration file {path} has no text", hint="pass a --calib file with enough text")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    stream = torch.tensor(ids, dtype=torch.int64)
    windows = stream.numel() // seq_len
    if windows == 0:
        raise MergeqError(
            f"calibration file {path} has {stream.numel()} tokens, fewer than one sample of --seq-len {seq_len}",
            hint="pass a longer --calib text or a smaller --seq-len",
        )
    warnings = []
    if windows < samples:
        warnings.append(
            f"calibration text {path} has {stream.numel()} tokens: {windows} samples of {seq_len} tokens "
            f"instead of the {samples} asked for (pass a longer --calib text for better quality)"
        )
        log.warning(warnings[-1])
        chosen = list(range(windows))
    else:
        chosen = [(i * windows) // samples for i in range(samples)]
    tokens = torch.stack([stream[w * seq_len : (w + 1) * seq_len] for w in chosen])
    return Calibration(
        tokens=tokens,
        source=str(loaded.path),
        sha256=loaded.sha256,
        text_tokens=stream.numel(),
        requested_samples=samples,
        warnings=warnings,
        text=loaded,
    )
