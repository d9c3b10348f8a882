"""Calibration and evaluation texts, in the format the user's data comes in. One loader for both.

Accepted:
- plain text (`.txt`, or any other suffix): the file as it is (less one trailing newline, as llama.cpp reads it);
- `.jsonl` with a `text` field (or plain JSON strings): one sample per line;
- `.jsonl` with chat `messages` (OpenAI-style `{"role", "content"}` lists): each conversation rendered through
  the model's chat template (the tokenizer's `apply_chat_template`), exactly as the model saw chat data;
- `.parquet` with a column: `FILE.parquet:COLUMN`, or `FILE.parquet` with a `text` or `messages` column.

Samples are joined by a blank line into one text. Every report names the file, its sha256, the format, the
sample count, the token count and how the samples were rendered (`LoadedText.describe`).

Library code takes a path. Turning a missing option or the literal `demo` into a path is the app's job, at the
command-line/config edge (mergeq.textopts.resolve_text_option).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mergeq.core.errors import MergeqError

FORMATS_HELP = (
    '.txt; .jsonl with a "text" field or chat "messages" (rendered with the model\'s chat template); .parquet:COLUMN'
)
SEPARATOR = "\n\n"
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer", "function")


@dataclass(frozen=True)
class LoadedText:
    path: Path
    sha256: str  # of the file's bytes
    format: str  # "txt", "jsonl/text", "jsonl/messages", "parquet/<column>", "parquet/<column> (messages)"
    samples: int  # documents / records / conversations in the file
    rendering: str  # how the samples became text
    text: str  # what is tokenized

    def describe(self, tokens: int | None = None) -> dict:
        found = {
            "file": str(self.path),
            "sha256": self.sha256,
            "format": self.format,
            "samples": self.samples,
            "rendering": self.rendering,
        }
        if tokens is not None:
            found["tokens"] = tokens
        return found


def split_column(spec: Path | str) -> tuple[Path, str | None]:
    """`data.parquet:column` -> (data.parquet, column); anything else -> (path, None)."""
    text = str(spec)
    head, sep, column = text.rpartition(":")
    if sep and head.lower().endswith(".parquet") and column and "/" not in column:
        return Path(head), column
    return Path(text), None


def _read(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise MergeqError(f"{what} text {path} does not exist or is not a file", hint=f"formats: {FORMATS_HELP}")
    return path.read_bytes()


def _decode(data: bytes, path: Path, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MergeqError(
            f"{what} text {path} is not UTF-8 (bad byte at offset {err.start})", hint="convert the file to UTF-8"
        ) from err


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise MergeqError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for message in messages:
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise MergeqError(
                f'{where}: each message needs a string "role" and a string "content", got {json.dumps(message)[:120]}'
            )
        if message["role"] not in CHAT_ROLES:
            raise MergeqError(f"{where}: unknown chat role {message['role']!r}; roles are {', '.join(CHAT_ROLES)}")
    return messages


class ChatRenderer:
    """Conversations -> text through the model's chat template."""

    def __init__(self, tokenizer, path: Path):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise MergeqError(
                f'{path} holds chat "messages", but the model\'s tokenizer has no chat template',
                hint='give the text as plain text or a "text" field, or use a model folder with a '
                "chat template (tokenizer_config.json or chat_template.jinja)",
            )
        self.tokenizer = tokenizer
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        self.rendering = (
            f"chat template of {name} (apply_chat_template, tokenize=False), conversations joined by a blank line"
        )

    def __call__(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False)


def _jsonl(raw: str, path: Path, tokenizer) -> tuple[list[str], str, str]:
    texts: list[str] = []
    kinds: set[str] = set()
    renderer = None
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MergeqError(
                f"{where}: not valid JSON ({exc.msg})",
                hint='each line must be a JSON object with a "text" field or chat "messages"',
            ) from exc
        if isinstance(record, str):
            texts.append(record)
            kinds.add("text")
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
            kinds.add("text")
        elif isinstance(record, dict) and "messages" in record:
            renderer = renderer or ChatRenderer(tokenizer, path)
            texts.append(renderer(_check_messages(record["messages"], where)))
            kinds.add("messages")
        else:
            raise MergeqError(
                f'{where}: no "text" field and no "messages"',
                hint='each line must be a JSON object with a "text" field or chat "messages"',
            )
    if len(kinds) > 1:
        raise MergeqError(
            f'{path} mixes "text" records and chat "messages" records', hint="use one kind of record per file"
        )
    if "messages" in kinds:
        return texts, "jsonl/messages", renderer.rendering
    return texts, "jsonl/text", 'the records\' "text" fields joined by a blank line'


def _parquet(path: Path, column: str | None, tokenizer) -> tuple[list[str], str, str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # a dependency of mergeq; missing only in a broken install
        raise MergeqError("reading .parquet needs pyarrow", hint="pip install pyarrow (scripts/setup.sh does)") from err
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise MergeqError(f"{path} is not a readable parquet file ({err})") from err
    names = list(schema.names)
    if column is None:
        column = next((c for c in ("text", "messages") if c in names), None)
        if column is None:
            raise MergeqError(f"{path}: say which column holds the text: {path}:COLUMN (columns: {', '.join(names)})")
    if column not in names:
        raise MergeqError(f"{path}: no column {column!r} (columns: {', '.join(names)})")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    if values and all(isinstance(v, str) for v in values):
        return values, f"parquet/{column}", f"column {column!r}, rows joined by a blank line"
    if values and all(isinstance(v, list) for v in values):
        renderer = ChatRenderer(tokenizer, path)
        texts = [renderer(_check_messages(v, f"{path} row {i}")) for i, v in enumerate(values)]
        return texts, f"parquet/{column} (messages)", renderer.rendering
    kinds = sorted({type(v).__name__ for v in values})
    raise MergeqError(f"{path}: column {column!r} holds {', '.join(kinds) or 'nothing'}, not text or chat messages")


def load_text(spec: Path | str, *, tokenizer=None, what: str = "calibration") -> LoadedText:
    """Read a calibration/evaluation text in any accepted format (see module doc). `tokenizer` renders chat."""
    path, column = split_column(spec)
    data = _read(path, what)
    sha = hashlib.sha256(data).hexdigest()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        texts, fmt, rendering = _parquet(path, column, tokenizer)
    elif suffix in (".jsonl", ".json"):
        texts, fmt, rendering = _jsonl(_decode(data, path, what), path, tokenizer)
    else:
        raw = _decode(data, path, what)
        if raw.endswith("\n"):
            raw = raw[:-1]  # llama.cpp's -f drops one trailing newline; so do we
        return LoadedText(path, sha, "txt", 1, "the file as it is", raw)
    if not texts:
        raise MergeqError(f"{what} text {path} holds no samples", hint=f"formats: {FORMATS_HELP}")
    return LoadedText(path, sha, fmt, len(texts), rendering, SEPARATOR.join(texts))
