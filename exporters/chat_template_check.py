"""Does llama.cpp prompt the model with the same tokens as transformers? The chat template round trip.

A GGUF carries the checkpoint's chat template (`tokenizer.chat_template`), but llama.cpp renders it with
its own Jinja engine and tokenizes the result with its own tokenizer. For a few fixed multi-turn
transcripts (with and without a system prompt) this module compares, token ID by token ID:

- transformers: `tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)` on
  the merged checkpoint, computed once per export in a subprocess (transformers imports torch, which
  the GGUF export otherwise does not need);
- llama.cpp: the pinned `llama-server` on the GGUF, started once per file on 127.0.0.1 and always stopped
  (exporters/llamacpp/server.py): `POST /apply-template` renders the prompt exactly as its chat endpoint
  does (it strips a leading BOS text when the vocabulary adds BOS itself), and `POST /tokenize` with
  `add_special` and `parse_special` tokenizes it exactly as the chat endpoint does before inference
  (tools/server/server-context.cpp: `tokenize_input_prompts(..., add_special=true, parse_special=true)`).

The result (`TemplateCheck`) goes into the GGUF report as `extra["chat_template"]`; any difference, and
a check that could not run, becomes a report warning. A GGUF without a template reports "no template".
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exporters.llamacpp.server import SERVER, STOP_TIMEOUT, LlamaServer, running_server
from mergeq.core.errors import MergeqError, ToolError

log = logging.getLogger(__name__)

REFERENCE = "transformers chat template"
REFERENCE_TIMEOUT = 300.0  # seconds for transformers to load the tokenizer and render every transcript

# ----------------------------------------------------------------------------------------------- transcripts


@dataclass(frozen=True)
class Transcript:
    name: str
    messages: tuple[dict[str, str], ...]  # ends with a user message: the model answers next


TRANSCRIPTS: tuple[Transcript, ...] = (
    Transcript("one user turn", ({"role": "user", "content": "Hello! Who are you?"},)),
    Transcript(
        "two turns, no system prompt",
        (
            {"role": "user", "content": "Hello! Who are you?"},
            {"role": "assistant", "content": "I am a helpful assistant."},
            {"role": "user", "content": "What can you do for me today?"},
        ),
    ),
    Transcript(
        "system prompt, one turn",
        (
            {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ),
    ),
    Transcript(
        "system prompt, three turns",
        (
            {"role": "system", "content": "You are a friendly support bot for a bicycle shop."},
            {"role": "user", "content": "My chain keeps slipping."},
            {"role": "assistant", "content": "Is the chain worn, or does it slip only in some gears?"},
            {"role": "user", "content": "Only in the smallest gear."},
            {"role": "assistant", "content": "Then the cable tension needs a small adjustment."},
            {"role": "user", "content": "How do I do that?"},
        ),
    ),
    Transcript(
        "newlines, numbers and accents",
        (
            {"role": "user", "content": "Make a list:\n1. apples\n2. pears"},
            {"role": "assistant", "content": "- apples\n- pears\n\nDone."},
            {"role": "user", "content": "Café, naïve, 3.14 and 42 - thanks!"},
        ),
    ),
    Transcript(
        "system prompt, code and an indented list",
        (
            {"role": "system", "content": "You review Python code."},
            {
                "role": "user",
                "content": "def area(r):\n    return 3.14159 * r ** 2\n\nSteps:\n  1. read r\n  2. print it",
            },
            {"role": "assistant", "content": "It works. Use math.pi instead of 3.14159."},
            {"role": "user", "content": "Like this?\n    return math.pi * r ** 2"},
        ),
    ),
)

# ----------------------------------------------------------------------------------------------- results


@dataclass
class TokenAt:
    id: int
    piece: str


@dataclass
class TranscriptResult:
    name: str
    matched: bool
    llama_cpp_tokens: int | None  # None when that side could not render the transcript
    transformers_tokens: int | None
    first_difference: int | None = None  # position of the first differing token (or where one side ends)
    llama_cpp: TokenAt | None = None  # the token at first_difference (None: the sequence ended there)
    transformers: TokenAt | None = None
    error: str | None = None  # a side that refused to render (both refusing counts as matched)


@dataclass
class TemplateCheck:
    status: str  # "matched", "mismatch", "no template", "not checked"
    transcripts: list[TranscriptResult] = field(default_factory=list)
    reason: str | None = None  # why "not checked"
    seconds: float = 0.0  # this file's llama-server run: start, every transcript, stop
    server_peak_rss_bytes: int = 0
    # transformers' renderings, once per export (shared by its files), in a subprocess started before the
    # conversion: its CPU seconds, and how long the export then still had to wait for it
    reference_cpu_seconds: float = 0.0
    reference_wait_seconds: float = 0.0
    reference_peak_rss_bytes: int = 0

    @property
    def wall_seconds(self) -> float:
        """What the check added to the export's wall time."""
        return round(self.reference_wait_seconds + self.seconds, 3)

    @property
    def checked(self) -> int:
        return len(self.transcripts)

    @property
    def matched(self) -> int:
        return sum(r.matched for r in self.transcripts)

    def to_json(self) -> dict:
        data = asdict(self)
        data["checked"], data["matched"], data["wall_seconds"] = self.checked, self.matched, self.wall_seconds
        return data

    def warnings(self, label: str) -> list[str]:
        if self.status == "not checked":
            return [f"{label}: the chat template round trip through llama.cpp was not checked: {self.reason}"]
        differing = [r for r in self.transcripts if not r.matched]
        if not differing:
            return []
        return [
            f"{label}: llama.cpp renders the chat template to other tokens than transformers in "
            f"{len(differing)} of {self.checked} transcripts; first: {describe(differing[0])}"
        ]


def describe(result: TranscriptResult) -> str:
    if result.error is not None:
        return f"'{result.name}': {result.error}"

    def side(token: TokenAt | None) -> str:
        return "ends" if token is None else f"{token.id} {token.piece!r}"

    return (
        f"'{result.name}' at token {result.first_difference} (llama.cpp {side(result.llama_cpp)}, "
        f"transformers {side(result.transformers)}; {result.llama_cpp_tokens} vs "
        f"{result.transformers_tokens} tokens)"
    )


# ----------------------------------------------------------------------------------------------- comparing


@dataclass(frozen=True)
class Rendering:
    """One side's tokens of one transcript, or why it could not render it."""

    ids: tuple[int, ...] = ()
    pieces: tuple[str, ...] = ()
    error: str | None = None


def compare(name: str, llama: Rendering, reference: Rendering) -> TranscriptResult:
    if llama.error is not None or reference.error is not None:
        both = llama.error is not None and reference.error is not None
        parts = [
            f"llama.cpp refused: {llama.error}" if llama.error else f"llama.cpp rendered {len(llama.ids)} tokens",
            f"transformers refused: {reference.error}"
            if reference.error
            else f"transformers rendered {len(reference.ids)} tokens",
        ]
        return TranscriptResult(
            name,
            both,
            None if llama.error else len(llama.ids),
            None if reference.error else len(reference.ids),
            error="; ".join(parts),
        )
    result = TranscriptResult(name, llama.ids == reference.ids, len(llama.ids), len(reference.ids))
    if not result.matched:
        at = next(
            (i for i, (a, b) in enumerate(zip(llama.ids, reference.ids)) if a != b),
            min(len(llama.ids), len(reference.ids)),
        )
        result.first_difference = at
        result.llama_cpp = TokenAt(llama.ids[at], llama.pieces[at]) if at < len(llama.ids) else None
        result.transformers = TokenAt(reference.ids[at], reference.pieces[at]) if at < len(reference.ids) else None
    return result


# ----------------------------------------------------------------------------------------------- transformers


def render_with_transformers(model_dir: str) -> dict:
    """The checkpoint's tokenizer renders and tokenizes every transcript (what the subprocess runs), as JSON data."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # reported as one line, in transformers' own words
        return {"load_error": f"{type(err).__name__}: {' '.join(str(err).split())}"}
    if not getattr(tokenizer, "chat_template", None):
        return {"template": False, "transcripts": {}}
    out = {}
    for transcript in TRANSCRIPTS:
        try:
            encoded = tokenizer.apply_chat_template(
                [dict(m) for m in transcript.messages], tokenize=True, add_generation_prompt=True, return_dict=True
            )
        except Exception as err:  # the template's own raise_exception(), or a Jinja error: that side refuses
            out[transcript.name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        ids = [int(i) for i in encoded["input_ids"]]
        out[transcript.name] = {"ids": ids, "pieces": [tokenizer.decode([i]) for i in ids]}
    return {"template": True, "transcripts": out}


def _main() -> None:
    result = render_with_transformers(sys.argv[1])
    result["cpu_seconds"] = time.process_time()
    sys.stdout.write("\n" + json.dumps(result) + "\n")  # the last line, whatever a library printed before


@dataclass(frozen=True)
class Reference:
    """transformers' renderings of every transcript for one checkpoint (None: it has no chat template)."""

    renderings: dict[str, Rendering] | None
    cpu_seconds: float = 0.0  # the subprocess's own CPU time
    wait_seconds: float = 0.0  # how long `result()` blocked for it
    peak_rss_bytes: int = 0


class PendingReference:
    """transformers' renderings, computed by a subprocess started now (the export starts it before the
    conversion, so that it overlaps with it). `result()` waits for it; `cancel()` stops it if still running."""

    def __init__(self, model_dir: Path):
        from exporters.llamacpp.pin import REPO_ROOT
        from exporters.llamacpp.run import die_with_parent
        from mergeq.core import faults  # inert unless MERGEQ_FAULT names this step
        from mergeq.core.memory import ChildPeak

        self.model_dir = Path(model_dir)
        argv = (sys.executable, "-c", "from exporters.chat_template_check import _main; _main()", str(model_dir))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self._started = time.perf_counter()
        self._outcome: Reference | MergeqError | None = None
        try:
            self._proc = subprocess.Popen(
                faults.tool_argv(REFERENCE, argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        except OSError as err:
            self._proc = None
            self._outcome = ToolError(f"{REFERENCE}: cannot run {sys.executable}: {err.strerror}")
            return
        self._memory = ChildPeak(self._proc.pid)

    def result(self) -> Reference | MergeqError:
        """The renderings, or the error that says why transformers could not render them."""
        if self._outcome is None:
            from exporters.llamacpp.run import ToolResult, quoted_tail, tool_failure

            waiting = time.perf_counter()
            try:
                out, err = self._proc.communicate(timeout=REFERENCE_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.cancel()
                self._outcome = ToolError(f"{REFERENCE} did not finish within {REFERENCE_TIMEOUT:.0f} s")
                return self._outcome
            peak = self._memory.finish(0)
            tool = ToolResult(out, err, time.perf_counter() - self._started, peak)
            if self._proc.returncode != 0:
                self._outcome = tool_failure(
                    REFERENCE,
                    self._proc.returncode,
                    tool,
                    hint=f"transformers could not load the tokenizer of {self.model_dir}",
                )
                return self._outcome
            try:
                data = json.loads(out.strip().splitlines()[-1])
                self._outcome = (
                    MergeqError(f"transformers could not load the tokenizer of {self.model_dir}: {data['load_error']}")
                    if "load_error" in data
                    else reference_from_json(data, time.perf_counter() - waiting, tool.peak_rss_bytes)
                )
            except (ValueError, IndexError, KeyError, TypeError):
                self._outcome = ToolError(
                    f"{REFERENCE} exited without its result line; its last output lines:\n{quoted_tail(tool)}"
                )
        return self._outcome

    def cancel(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            from exporters.llamacpp.run import stop_group

            stop_group(self._proc, STOP_TIMEOUT)
            self._memory.finish(0)


def reference_from_json(data: dict, wait_seconds: float = 0.0, peak_rss_bytes: int = 0) -> Reference:
    """A Reference from `render_with_transformers`' data."""
    renderings = None
    if data["template"]:
        renderings = {
            name: Rendering(tuple(r["ids"]), tuple(r["pieces"])) if "ids" in r else Rendering(error=r["error"])
            for name, r in data["transcripts"].items()
        }
    return Reference(renderings, round(data.get("cpu_seconds", 0.0), 3), round(wait_seconds, 3), peak_rss_bytes)


# ----------------------------------------------------------------------------------------------- llama.cpp's side


def render(server: LlamaServer, messages: tuple[dict[str, str], ...]) -> Rendering:
    """The chat prompt llama.cpp builds for `messages` (generation prompt added), as token IDs and pieces."""
    status, body = server.request("/apply-template", {"messages": list(messages), "add_generation_prompt": True})
    if status != 200:
        return Rendering(error=f"/apply-template answered HTTP {status}: {_error_text(body)}")
    status, body = server.request(
        "/tokenize", {"content": body["prompt"], "add_special": True, "parse_special": True, "with_pieces": True}
    )
    if status != 200:
        return Rendering(error=f"/tokenize answered HTTP {status}: {_error_text(body)}")
    tokens = body["tokens"]
    return Rendering(tuple(int(t["id"]) for t in tokens), tuple(_piece_text(t["piece"]) for t in tokens))


def _error_text(body: dict) -> str:
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error if error is not None else body)


def _piece_text(piece) -> str:
    """/tokenize gives a piece as text, or as a list of byte values when it is not valid UTF-8 alone."""
    if isinstance(piece, list):
        return bytes(piece).decode("utf-8", errors="backslashreplace")
    return str(piece)


# ----------------------------------------------------------------------------------------------- the check


def has_template(gguf: Path) -> bool:
    from exporters.gguf_inspect import read_gguf

    return bool(read_gguf(gguf).metadata.get("tokenizer.chat_template"))


def check_gguf(gguf: Path, ref: Reference) -> TemplateCheck:
    """Render every transcript with llama.cpp from `gguf` and compare with transformers' `ref`."""
    started = time.perf_counter()
    if not has_template(gguf):
        return TemplateCheck("no template")
    if ref.renderings is None:
        return TemplateCheck("not checked", reason="the merged checkpoint has no chat template to compare with")
    try:
        with running_server(gguf) as server:
            results = [compare(t.name, render(server, t.messages), ref.renderings[t.name]) for t in TRANSCRIPTS]
    except (MergeqError, OSError, ValueError, KeyError) as err:
        # OSError: the connection broke (the server died mid-request); ValueError, KeyError: an answer that is
        # not the JSON this pinned server's source promises
        reason = str(err) if isinstance(err, MergeqError) else f"{SERVER}: {type(err).__name__}: {err}"
        log.warning("%s: chat template not checked: %s", gguf.name, reason)
        return TemplateCheck("not checked", reason=reason, seconds=round(time.perf_counter() - started, 3))
    check = TemplateCheck(
        "matched" if all(r.matched for r in results) else "mismatch",
        results,
        seconds=round(time.perf_counter() - started, 3),
        server_peak_rss_bytes=server.peak_rss_bytes,
    )
    for warning in check.warnings(gguf.name):
        log.warning("%s", warning)
    return check


def check_ggufs(model_dir: Path, ggufs: list[Path], pending: PendingReference | None = None) -> list[TemplateCheck]:
    """The round trip for every GGUF of one export: transformers renders the checkpoint's transcripts once
    (`pending`: started earlier, else now), then one llama-server run per file.
    Never raises for a check that cannot run: that is its result."""
    ggufs = [Path(p) for p in ggufs]
    if not any(has_template(p) for p in ggufs):
        return [TemplateCheck("no template") for _ in ggufs]
    log.info("checking the chat template of %d GGUF file(s) through llama-server against transformers", len(ggufs))
    ref = (pending or PendingReference(model_dir)).result()
    if isinstance(ref, MergeqError):
        log.warning("chat template round trip not checked: %s", ref)
    checks = []
    for path in ggufs:
        if not has_template(path):
            check = TemplateCheck("no template")
        elif isinstance(ref, MergeqError):
            check = TemplateCheck("not checked", reason=str(ref))
        else:
            check = check_gguf(path, ref)
            check.reference_cpu_seconds, check.reference_wait_seconds = ref.cpu_seconds, ref.wait_seconds
            check.reference_peak_rss_bytes = ref.peak_rss_bytes
        checks.append(check)
    return checks
