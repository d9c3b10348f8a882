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
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from exporters.eval_options import EvalOptions
from exporters.report import ArtifactReport, QualityInfo, SizeInfo, measure_stage
from mergeq.core.atomic import atomic_dir, atomic_file, write_json
from mergeq.core.errors import MergeqError, ToolError
from mergeq.core.hashing import sha256_file
from mergeq.core.locks import exclusive
from mergeq.core.metrics import MetricSums, Windows, check_finite, first_scored, log_probs, make_windows, tokenize
from mergeq.core.modelfiles import read_model_config
from mergeq.core.progress import track

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_KEEP = 3  # reference cache entries kept (newest used first); each is n_scored x vocab x 4 bytes
EVICT_AFTER = 3600  # seconds: an entry used more recently is never evicted (another run may be reading it)
INT4_METHODS = ("awq", "gptq", "compressed-tensors")
LLAMA_LOGITS_MAGIC = b"_logits_"
LLAMA_BAND_NATS = 16.0  # llama-perplexity stores log-probs within 16 nats of the top token, 16 bits each


@dataclass(frozen=True)
class EvalText:
    path: Path
    text: str  # as llama.cpp reads it: the file's UTF-8 text less one trailing newline
    sha256: str  # of the file's bytes
    loaded: object | None = None  # mergeq.core.texts.LoadedText: format, samples, rendering

    def describe(self, tokens: int | None = None) -> dict:
        return self.loaded.describe(tokens) if self.loaded is not None else {"file": str(self.path),
                                                                              "sha256": self.sha256}


@dataclass
class EvalResult:
    quality: QualityInfo
    warnings: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    tool_peak_rss_bytes: int = 0  # the llama.cpp child's peak (GGUF), counted in the stage's cost


# ---------------------------------------------------------------------------------------------- inputs


def load_text(path: Path | str | None, tokenizer=None) -> EvalText:
    """The evaluation text in any format mergeq.core.texts reads (chat data rendered with `tokenizer`'s template).
    There is no default: the command line or config resolves one (mergeq.textopts.resolve_text_option)."""
    from mergeq.core.texts import FORMATS_HELP
    from mergeq.core.texts import load_text as load_any

    if path is None:
        raise MergeqError(f"no evaluation text given ({FORMATS_HELP})",
                          hint="pass --eval-text FILE (mergeq export), --text FILE (mergeq eval) or [eval] text "
                               "(pipeline config); `demo` names the demo's evaluation text")
    loaded = load_any(path, tokenizer=tokenizer, what="evaluation")
    return EvalText(path=loaded.path, text=loaded.text, sha256=loaded.sha256, loaded=loaded)


def detect_format(artifact: Path) -> str:
    """"gguf", "int4" (AWQ/GPTQ/compressed-tensors directory) or "hf" (plain checkpoint directory)."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise MergeqError(f"artifact {artifact} does not exist", hint="check the path")
    if artifact.is_file():
        with open(artifact, "rb") as handle:
            magic = handle.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise MergeqError(f"artifact {artifact} is a file but not a GGUF file (magic {magic!r})",
                          hint="pass a .gguf file or a Hugging Face checkpoint directory")
    config = read_model_config(artifact)
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method is None:
        return "hf"
    if method in INT4_METHODS:
        return "int4"
    raise MergeqError(f"artifact {artifact}: quantization method {method!r} cannot be evaluated",
                      hint=f"mergeq evaluates plain checkpoints, GGUF files and {', '.join(INT4_METHODS)} directories")


def check_checkpoint(directory: Path) -> None:
    """Validate every safetensors header of a checkpoint (names the file on a truncated or damaged one)."""
    from mergeq.core.checkpoint import read_safetensors_header

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files and not any(directory.glob("*.bin")):
        raise MergeqError(f"{directory} holds no weights (*.safetensors or *.bin)", hint="pass a checkpoint directory")
    for path in files:
        read_safetensors_header(path)


def check_gguf(path: Path):
    """Read a GGUF's header and tensor list with the pinned gguf-py (a damaged file raises naming it)."""
    from exporters.gguf_inspect import read_gguf

    return read_gguf(Path(path))


def artifact_size(artifact: Path, reference: Path) -> tuple[SizeInfo, str]:
    """Size facts of any artifact and a name for its quantization, for artifacts without an exporter report."""
    from mergeq.core.checkpoint import read_safetensors_header

    def params_and_bytes(directory: Path) -> tuple[int, int, set[str]]:
        params = size = 0
        dtypes = set()
        for path in sorted(Path(directory).glob("*.safetensors")):
            infos, _ = read_safetensors_header(path)
            params += sum(i.numel for i in infos.values())
            dtypes |= {str(i.dtype).removeprefix("torch.") for i in infos.values() if i.dtype.is_floating_point}
            size += path.stat().st_size
        return params, size, dtypes

    kind = detect_format(artifact)
    if kind == "gguf":
        from exporters.gguf_inspect import size_info

        summary = check_gguf(artifact)
        info, _ = size_info(summary, artifact.stem, None)
        return info, artifact.stem
    ref_params, _, _ = params_and_bytes(reference)
    params, size, dtypes = params_and_bytes(artifact)
    if kind == "hf":
        names = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
        quant = "+".join(sorted(names.get(d, d) for d in dtypes)) or "unknown"
        return SizeInfo(size, 2 * params, 8 * size / params if params else float("nan"), None), quant
    q = read_model_config(artifact)["quantization_config"]
    quant = f"w{q.get('bits', '?')}g{q.get('group_size', '?')}"
    return SizeInfo(size, 2 * ref_params, 8 * size / ref_params if ref_params else float("nan"), None), quant


@functools.lru_cache(maxsize=16)
def _fingerprint_cached(directory: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in stamp:
        digest.update(name.encode() + b"\0" + sha256_file(Path(directory) / name).encode() + b"\n")
    return digest.hexdigest()


def checkpoint_fingerprint(directory: Path) -> str:
    """sha256 over the weight files and config.json of a checkpoint (memoized per size and mtime)."""
    directory = Path(directory).resolve()
    names = sorted(p.name for p in directory.iterdir()
                   if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json"))
    stamp = tuple((n, (directory / n).stat().st_size, (directory / n).stat().st_mtime_ns) for n in names)
    return _fingerprint_cached(str(directory), stamp)


# ------------------------------------------------------------------------------------------ tokenizing


def load_tokenizer(reference: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(reference))
    except Exception as err:
        raise MergeqError(f"cannot load the tokenizer of the reference {reference}: {err}",
                          hint="the reference must be a Hugging Face checkpoint directory with its tokenizer") from err


# --------------------------------------------------------------------------------------- torch models


def load_torch_model(artifact: Path, kind: str):
    """An fp32 torch model of the artifact as written on disk ("hf" or "int4" directories)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # mergeq shows its own progress; transformers' bar per load is noise
    try:
        return _load_torch_model(Path(artifact), kind)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load_torch_model(artifact: Path, kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if kind == "hf":
            check_checkpoint(artifact)
            model = AutoModelForCausalLM.from_pretrained(str(artifact), dtype=torch.float32)
        elif kind == "int4":
            from exporters.int4.formats import dequantized_state_dict

            check_checkpoint(artifact)
            state = dequantized_state_dict(artifact, dtype=torch.float32, module_names=True)
            config = AutoConfig.from_pretrained(str(artifact))
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            missing, unexpected = model.load_state_dict(state, strict=False)
            tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
            missing = [k for k in missing if k not in tied]
            if missing or unexpected:
                raise MergeqError(
                    f"unpacked weights of {artifact} do not fit its architecture: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}", hint="the artifact is damaged or was written by another tool")
            if tied:
                model.tie_weights()
        else:
            raise ValueError(kind)
    except MergeqError:
        raise
    except Exception as err:
        raise MergeqError(f"cannot load {artifact}: {type(err).__name__}: {err}",
                          hint="the checkpoint is damaged or incomplete; export it again") from err
    model.eval()
    return model


def model_logprobs(artifact: Path, kind: str, windows: Windows, options: EvalOptions,
                   label: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(window index, fp32 log-probabilities [scored, vocab]) of a checkpoint ("hf" or "int4") for every window.

    Streamed one decoder layer at a time (mergeq/core/streaming.py) where the architecture has a layer mapping
    and options.streaming is on; otherwise the whole model is loaded (the reference implementation)."""
    from mergeq.core import streaming

    if options.streaming and streaming.supported(read_model_config(artifact)):
        yield from streamed_logprobs(artifact, kind, windows, options, label)
        return
    if options.streaming:
        log.info("%s: no layer mapping for this architecture; evaluating the whole model in memory", artifact)
    model = load_torch_model(artifact, kind)
    yield from torch_logprobs(model, windows, _batch(options), label)


def streamed_logprobs(artifact: Path, kind: str, windows: Windows, options: EvalOptions,
                      label: str) -> Iterator[tuple[int, torch.Tensor]]:
    """model_logprobs, one decoder layer in memory at a time, on options.device."""
    from exporters.streaming import streamed
    from mergeq.core import streaming
    from mergeq.core.device import resolve_device

    check_checkpoint(artifact)
    device = resolve_device(options.device)
    scored = slice(first_scored(windows.n_ctx), windows.n_ctx - 1)
    try:
        with streamed(artifact, kind, device) as model:
            hidden = streaming.final_hidden(model, windows.tokens.to(device), scored, _batch(options),
                                            progress=f"eval {label} layers")
            for start, logits in streaming.logits_blocks(model, hidden):
                check_finite(logits, label)
                for j in range(logits.shape[0]):
                    yield start + j, log_probs(logits[j]).cpu()
    except MergeqError:
        raise
    except Exception as err:
        raise MergeqError(f"cannot evaluate {artifact}: {type(err).__name__}: {err}",
                          hint="the checkpoint is damaged or incomplete; export it again") from err


def torch_logprobs(model, windows: Windows, batch: int, label: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(window index, fp32 log-probabilities [scored, vocab]) for every window, in order."""
    import inspect

    first = first_scored(windows.n_ctx)
    keep = windows.n_ctx - first
    kwargs = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    starts = range(0, windows.n_windows, batch)
    with torch.inference_mode():
        for start in track(starts, f"eval {label}"):
            ids = windows.tokens[start : start + batch]
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits[:, -keep:-1]
            check_finite(logits, label)
            for j in range(ids.shape[0]):
                yield start + j, log_probs(logits[j])


# ------------------------------------------------------------------------------- the reference cache


@dataclass
class ReferenceLogprobs:
    """Cached fp32 log-probabilities of the reference at every scored position, one file per window."""

    directory: Path
    n_windows: int

    def window(self, i: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.directory / f"window-{i:04d}.safetensors"), framework="pt") as handle:
            return handle.get_tensor("logprobs")


def _tokens_sha(windows: Windows) -> str:
    digest = hashlib.sha256(windows.tokens.numpy().tobytes())
    digest.update(windows.targets.numpy().tobytes())
    return digest.hexdigest()


def reference_logprobs(reference: Path, windows: Windows, options: EvalOptions) -> ReferenceLogprobs:
    """The reference's log-probabilities for these windows: from the cache, or computed once and cached."""
    from safetensors.torch import save_file

    key_data = {"version": CACHE_VERSION, "reference": checkpoint_fingerprint(reference),
                "tokens": _tokens_sha(windows), "n_ctx": windows.n_ctx, "torch": torch.__version__}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:32]
    root = options.resolved_cache()
    entry = root / f"ref-{key}"
    with exclusive(root / f"ref-{key}.lock", f"another process is computing the reference {reference}; waiting"):
        if (entry / "meta.json").is_file():
            os.utime(entry / "meta.json")
            log.info("reference log-probs from cache %s", entry)
        else:
            with atomic_dir(entry) as tmp:
                for i, lp in model_logprobs(reference, "hf", windows, options, f"reference {Path(reference).name}"):
                    save_file({"logprobs": lp.contiguous()}, str(tmp / f"window-{i:04d}.safetensors"))
                write_json(tmp / "meta.json", {**key_data, "reference_path": str(reference),
                                               "windows": windows.n_windows})
    _evict(root)
    return ReferenceLogprobs(entry, windows.n_windows)


def _batch(options: EvalOptions) -> int:
    return max(1, options.batch_windows)


def _evict(root: Path) -> None:
    """Keep the CACHE_KEEP most recently used references, and any used in the last EVICT_AFTER seconds."""
    entries = [p for p in root.glob("ref-*") if p.is_dir() and (p / "meta.json").is_file()]
    entries.sort(key=lambda p: (p / "meta.json").stat().st_mtime, reverse=True)
    now = time.time()
    for old in entries[CACHE_KEEP:]:
        if now - (old / "meta.json").stat().st_mtime > EVICT_AFTER:
            shutil.rmtree(old, ignore_errors=True)
            (root / f"{old.name}.lock").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- llama.cpp


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
            raise ToolError(f"llama-perplexity printed no {key.replace('_', ' ')}",
                            hint="its output format changed or the run stopped early; rerun with -v")
        last = matches[-1]
        if key == "chunks":
            found["chunks"], found["n_ctx"] = float(last[0]), float(last[1])
        else:
            found[key] = float(last)
    return found


def run_kl_divergence(command, artifact: Path, attempts: int = 2):
    """Run `llama-perplexity --kl-divergence` and parse its statistics; returns (stats, tool result).

    llama-perplexity can exit 0 without (all of) its statistics: its KL pass stops early on "failed to decode"
    or a base file it cannot read, and the pinned common/log.cpp logs from a thread and never flushes it at
    exit (it leaks the logger on purpose, llama.cpp issue 22142), so on a loaded machine the last lines can be
    lost. It runs again, up to `attempts` times, with a warning, then fails quoting its last output lines."""
    from exporters.llamacpp.run import quoted_tail, run_tool

    for attempt in range(1, attempts + 1):
        result = run_tool(command, hint=f"if {artifact} is damaged, export it again")
        try:
            return parse_kl_output(result.stdout + "\n" + result.stderr), result
        except ToolError as err:
            quoted = quoted_tail(result, 12)
            if attempt == attempts:
                raise ToolError(f"{err.args[0]}; its last output lines:\n{quoted}", hint=err.hint) from None
            log.warning("llama-perplexity exited 0 without statistics on %s; running it once more. Its last "
                        "output lines:\n%s", artifact, quoted)
    raise AssertionError("unreachable")


_TOKEN_COUNT = re.compile(r"tokenizes to only (\d+) tokens")


def llama_token_count(gguf: Path, text: str, n_ctx_probe: int, options: EvalOptions) -> int | None:
    """How many tokens llama.cpp makes of `text` (with its BOS), from llama-perplexity's too-short message.

    With a context of `n_ctx_probe` >= half the text's tokens, llama-perplexity only loads the model,
    tokenizes, prints the count and stops.
    """
    from exporters.llamacpp.build import tool_command
    from exporters.llamacpp.run import run_tool, weight_flags

    with tempfile.TemporaryDirectory(prefix="mergeq-eval-") as tmp:
        probe = Path(tmp) / "prefix.txt"
        probe.write_text(text + "\n", encoding="utf-8")  # llama.cpp drops one trailing newline
        command = tool_command("llama-perplexity", "-m", gguf, "-f", probe, "-c", n_ctx_probe,
                               "-b", min(2048, n_ctx_probe), "-t", options.threads or os.cpu_count() or 1,
                               *weight_flags(gguf)[0])
        result = run_tool(command, hint=f"if {gguf} is damaged, export it again")
    found = _TOKEN_COUNT.findall(result.stdout + result.stderr)
    return int(found[-1]) if found else None


def llama_version() -> dict:
    from exporters.llamacpp.pin import version_info

    return version_info()


# ------------------------------------------------------------------------------------------ evaluate


def evaluate(artifact: Path, reference: Path, text: Path | None, settings: EvalOptions | None = None) -> QualityInfo:
    """Quality of `artifact` against `reference` on `text` (a path; see load_text)."""
    result = evaluate_full(artifact, reference, text, settings)
    for warning in result.warnings:
        log.warning("%s", warning)
    return result.quality


def evaluate_into_report(report: ArtifactReport, reference: Path, text: Path | None,
                         settings: EvalOptions | None = None) -> None:
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


def evaluate_full(artifact: Path, reference: Path, text: Path | None,
                  settings: EvalOptions | None = None) -> EvalResult:
    options = settings or EvalOptions()
    artifact, reference = Path(artifact), Path(reference)
    if not reference.is_dir():
        raise MergeqError(f"reference {reference} is not a checkpoint directory",
                          hint="the reference is the merged fp16/bf16 Hugging Face checkpoint")
    if detect_format(reference) != "hf":
        raise MergeqError(f"reference {reference} is a quantized checkpoint",
                          hint="compare against the merged fp16/bf16 checkpoint")
    check_checkpoint(reference)
    kind = detect_format(artifact)
    tokenizer = load_tokenizer(reference)
    eval_text = load_text(text, tokenizer)
    ids, bos = tokenize(tokenizer, eval_text.text)
    windows = make_windows(ids, options.n_ctx, options.max_windows, bos, source=str(eval_text.path))
    warnings: list[str] = []
    provenance = {
        "text": str(eval_text.path), "text_sha256": eval_text.sha256, "reference": str(reference),
        "reference_sha256": checkpoint_fingerprint(reference), "n_ctx": windows.n_ctx,
        "windows": windows.n_windows, "text_tokens": windows.text_tokens, "versions": _versions(),
        "text_source": eval_text.describe(windows.text_tokens),
    }
    tool_peak = 0
    if kind == "gguf":
        stats, sums = _evaluate_gguf(artifact, reference, windows, options, provenance)
        tool_peak = stats["peak_rss_bytes"]
        _check_tokenization(artifact, tokenizer, eval_text, windows, options, warnings)
        quality = QualityInfo(
            perplexity=stats["perplexity"], reference_perplexity=sums.reference_perplexity,
            kl_divergence=stats["kl_divergence"], top1_agreement=stats["top1_percent"] / 100,
            eval_tokens=windows.scored_tokens, text_sha256=eval_text.sha256, context_length=windows.n_ctx,
            evaluator="llama.cpp", windows=windows.n_windows, text_tokens=windows.text_tokens)
    else:
        sums = _evaluate_torch(artifact, kind, reference, windows, options)
        quality = QualityInfo(
            perplexity=sums.perplexity, reference_perplexity=sums.reference_perplexity,
            kl_divergence=sums.kl_divergence, top1_agreement=sums.top1_agreement, eval_tokens=sums.count,
            text_sha256=eval_text.sha256, context_length=windows.n_ctx, evaluator="torch",
            windows=windows.n_windows, text_tokens=windows.text_tokens)
    for name, value in (("perplexity", quality.perplexity), ("KL divergence", quality.kl_divergence)):
        if not math.isfinite(value):
            raise MergeqError(f"{artifact} gives a non-finite {name} ({value})",
                              hint="the artifact's weights are damaged or overflow; export it again")
    return EvalResult(quality, warnings, provenance, tool_peak)


def _evaluate_torch(artifact: Path, kind: str, reference: Path, windows: Windows, options: EvalOptions) -> MetricSums:
    ref = reference_logprobs(reference, windows, options)
    sums = MetricSums()
    if kind == "hf" and artifact.resolve() == reference.resolve():
        for i in range(windows.n_windows):
            lp = ref.window(i)
            sums.add(lp, lp, windows.targets[i])
        return sums
    for i, lp in model_logprobs(artifact, kind, windows, options, artifact.name):
        sums.add(ref.window(i), lp, windows.targets[i])
    return sums


LOGITS_BUDGET = 512 << 20  # llama-perplexity holds fp32 logits of its whole batch: windows x n_ctx x n_vocab


def parallel_windows(n_ctx: int, n_vocab: int) -> int:
    """How many windows llama-perplexity scores in one batch: up to 2048 tokens, fewer where the batch's logits
    would pass LOGITS_BUDGET (a 128k vocabulary: one window of 512 tokens holds 0.25 GiB of logits). Same
    results, less memory."""
    return max(1, min(2048 // n_ctx, LOGITS_BUDGET // (n_ctx * n_vocab * 4)))


def _evaluate_gguf(artifact: Path, reference: Path, windows: Windows, options: EvalOptions, provenance: dict):
    """llama-perplexity in KL-divergence mode against the cached reference: our windows, llama.cpp's logits."""
    from exporters.llamacpp.build import tool_command
    from exporters.llamacpp.run import weight_flags

    if windows.scored_tokens < 100:
        raise MergeqError(f"evaluating a GGUF needs at least 100 scored tokens; these windows score "
                          f"{windows.scored_tokens}",
                          hint="use a longer evaluation text or a larger n_ctx (llama-perplexity prints no "
                               "statistics below 100 tokens)")
    summary = check_gguf(artifact)
    ref = reference_logprobs(reference, windows, options)
    n_vocab = int(ref.window(0).shape[-1])
    gguf_vocab = summary.array_lengths.get("tokenizer.ggml.tokens")
    if gguf_vocab is not None and gguf_vocab != n_vocab:
        raise MergeqError(f"{artifact} has a vocabulary of {gguf_vocab} tokens, the reference {reference} {n_vocab}",
                          hint="evaluate the GGUF against the checkpoint it was converted from")
    base = ref.directory / "llama-base.bin"
    with exclusive(ref.directory.parent / f"{ref.directory.name}.lock", "waiting for the reference cache"):
        if not base.is_file():
            write_llama_base(base, ref, windows)
    threads = options.threads or os.cpu_count() or 1
    n_ctx = windows.n_ctx
    flags, why = weight_flags(artifact)
    if why:
        log.warning("%s", why)
        provenance["llama_weights"] = why
    command = tool_command(
        "llama-perplexity", "-m", artifact, "--kl-divergence", "--kl-divergence-base", base, "-c", n_ctx,
        "-b", n_ctx * parallel_windows(n_ctx, n_vocab), "-t", threads, *flags)
    log.info("running %s", " ".join(command.argv))
    stats, result = run_kl_divergence(command, artifact)
    stats["peak_rss_bytes"] = result.peak_rss_bytes
    provenance["llama.cpp"] = llama_version()
    if (int(stats["chunks"]), int(stats["n_ctx"])) != (windows.n_windows, n_ctx):
        raise ToolError(f"llama-perplexity on {artifact} evaluated {int(stats['chunks'])} windows of "
                        f"{int(stats['n_ctx'])} tokens, mergeq asked for {windows.n_windows} of {n_ctx}")
    sums = MetricSums()  # the reference's own numbers, exact, from the cache
    for i in range(windows.n_windows):
        lp = ref.window(i)
        sums.add(lp, lp, windows.targets[i])
    if abs(stats["reference_perplexity"] / sums.reference_perplexity - 1) > 1e-3:
        raise ToolError(f"llama-perplexity read the reference perplexity as {stats['reference_perplexity']:.4f}, "
                        f"mergeq computed {sums.reference_perplexity:.4f}", hint="the reference cache may be damaged; "
                        f"remove {ref.directory} and rerun")
    return stats, sums


def _check_tokenization(artifact: Path, tokenizer, eval_text: EvalText, windows: Windows, options: EvalOptions,
                        warnings: list[str]) -> None:
    """Warn when llama.cpp would tokenize the evaluated text into another number of tokens than the reference."""
    prefix, hf_count = eval_text_prefix(tokenizer, eval_text, windows)
    count = llama_token_count(artifact, prefix, hf_count, options)
    if count is None:
        warnings.append("could not read llama.cpp's token count of the evaluation text")
    elif count != hf_count:
        warnings.append(
            f"llama.cpp tokenizes the evaluated text into {count} tokens, the reference tokenizer into {hf_count}: "
            "in llama.cpp this model sees other tokens for the same text than in transformers. The scores here "
            "use the reference tokenizer's tokens for every format, so they stay comparable")


def eval_text_prefix(tokenizer, eval_text: EvalText, windows: Windows) -> tuple[str, int]:
    """The text the evaluated windows cover, and its token count with the reference tokenizer (with BOS)."""
    encoding = tokenizer(eval_text.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    bos = 1 if windows.bos_id is not None else 0
    used = windows.n_windows * windows.n_ctx - bos  # text tokens inside the windows
    end = encoding["offset_mapping"][used - 1][1]
    prefix = eval_text.text[:end]
    count = len(tokenizer(prefix, add_special_tokens=False, verbose=False)["input_ids"]) + bos
    return prefix, count


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
