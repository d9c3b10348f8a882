"""Calibration data: a text or jsonl file -> N samples of L tokens, with the text's sha256.

The file is tokenized as one stream; samples are non-overlapping windows of L tokens spread evenly over
it, so the same file, tokenizer and (N, L) give the same samples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergeq.errors import MergeqError
from mergeq.hashing import sha256_file

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    tokens: torch.Tensor  # [samples, seq_len] int64
    source: str  # the file the text came from
    sha256: str  # of the file's bytes
    text_tokens: int  # tokens in the whole text
    requested_samples: int
    warnings: list[str] = field(default_factory=list)

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
        }


def read_calibration_text(path: Path) -> str:
    """The text of a .txt file, or of a .jsonl file's records joined by blank lines (each record a string
    or an object with a "text" field)."""
    path = Path(path)
    if not path.is_file():
        raise MergeqError(f"calibration file {path} not found", hint="pass --calib FILE (.txt or .jsonl)")
    raw = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix.lower() not in (".jsonl", ".json"):
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MergeqError(f"{path}:{number}: not valid JSON ({exc.msg})",
                              hint='each line must be a JSON string or an object with a "text" field') from exc
        if isinstance(record, str):
            texts.append(record)
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
        else:
            raise MergeqError(f'{path}:{number}: no "text" field',
                              hint='each line must be a JSON string or an object with a "text" field')
    return "\n\n".join(texts)


def load_calibration(path: Path, tokenizer, samples: int, seq_len: int) -> Calibration:
    if samples < 1 or seq_len < 2:
        raise MergeqError(f"--samples {samples} --seq-len {seq_len}: need at least 1 sample of 2 tokens")
    text = read_calibration_text(path)
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
    return Calibration(tokens=tokens, source=str(path), sha256=sha256_file(Path(path)), text_tokens=stream.numel(),
                       requested_samples=samples, warnings=warnings)
