"""The small files of a Hugging Face model folder besides its weights: config.json, read with one clear
error, and the tokenizer / chat-template / generation files a serving stack needs, listed once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mergeq.core.errors import MergeqError

CONFIG_NAME = "config.json"
# what a tokenizer (and its chat template) may consist of, in every format transformers loads
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "spiece.model",
    "vocab.txt",
)
# copied beside converted weights: the tokenizer, then the generation defaults
AUX_FILES = (*TOKENIZER_FILES, "generation_config.json")
# the files one of which a folder needs for transformers to load a tokenizer from it
TOKENIZER_MAIN_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def read_json_object(path: Path, *, hint: str | None = None) -> dict:
    """A JSON file holding an object; a MergeqError naming the file when it is missing, unreadable or not one."""
    path = Path(path)
    if not path.is_file():
        raise MergeqError(f"{path} is missing", hint=hint)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MergeqError(f"{path} is not valid JSON: {err}", hint="the file is damaged; re-save the model") from err
    if not isinstance(data, dict):
        raise MergeqError(f"{path} is not a JSON object", hint="the file is damaged; re-save the model")
    return data


def read_model_config(folder: Path) -> dict:
    """config.json of a Hugging Face model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MergeqError(
            f"model directory {folder} does not exist or is not a directory",
            hint="pass a Hugging Face model folder (config.json and the weights)",
        )
    return read_json_object(
        folder / CONFIG_NAME,
        hint=f"{folder} is not a Hugging Face model folder: pass the folder that holds config.json and the weights",
    )


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_MAIN_FILES)


def copy_aux_files(sources: list[Path], out_dir: Path, tokenizer_from: list[Path] = ()) -> list[str]:
    """Copy AUX_FILES into `out_dir`: each name from the first of `sources` that has it; the tokenizer files of
    the first folder in `tokenizer_from` that has any replace those (an adapter's own tokenizer with its added
    tokens wins over the base's). Returns the names copied, sorted."""
    copied: dict[str, Path] = {}
    for src in sources:
        for name in AUX_FILES:
            if (Path(src) / name).is_file() and name not in copied:
                copied[name] = Path(src) / name
    for folder in tokenizer_from:
        present = {n: Path(folder) / n for n in TOKENIZER_FILES if (Path(folder) / n).is_file()}
        if present:
            copied.update(present)
            break
    for name, path in sorted(copied.items()):
        shutil.copyfile(path, Path(out_dir) / name)
    return sorted(copied)
