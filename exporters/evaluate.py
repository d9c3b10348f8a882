"""The evaluator: perplexity, KL divergence and top-1 agreement of any artifact against its fp16 reference.

One definition for every format (see exporters/metrics.py and docs/evaluation.md). The artifact is
evaluated as written on disk:

- Hugging Face fp16/bf16/fp32 directories: transformers loads the files, computation in fp32;
- AWQ / GPTQ / compressed-tensors directories: our own unpacking (`exporters.int4.formats`) into an fp32
  model of the architecture in the artifact's config;
- GGUF files: llama.cpp's `llama-perplexity` with the same context, windows and scored tokens; it writes
  the artifact's log-probabilities of every scored position, and this module computes the metrics from
  them with the same code as the torch path.

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
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from exporters.metrics import MetricSums, Windows, check_finite, first_scored, log_probs, make_windows
from exporters.report import ArtifactReport, QualityInfo, SizeInfo, measure_stage
from mergeq.atomic import atomic_dir, write_json
from mergeq.errors import MergeqError, ToolError
from mergeq.hashing import sha256_file
from mergeq.locks import exclusive
from mergeq.paths import cache_root
from mergeq.progress import track

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_KEEP = 3  # reference cache entries kept (newest used first); each is n_scored x vocab x 4 bytes
EVICT_AFTER = 3600  # seconds: an entry used more recently is never evicted (another run may be reading it)
INT4_METHODS = ("awq", "gptq", "compressed-tensors")
LLAMA_LOGITS_MAGIC = b"_logits_"
LLAMA_BAND_NATS = 16.0  # llama-perplexity stores log-probs within 16 nats of the top token, 16 bits each


@dataclass(frozen=True)
class EvalOptions:
    """How much text to score and how. The defaults fit one demo artifact in under a minute on 2 cores."""

    n_ctx: int = 512  # tokens per window (llama-perplexity's -c)
    max_windows: int = 16  # at most this many windows from the start of the text
    batch_windows: int = 1  # windows per torch forward pass
    threads: int | None = None  # llama.cpp threads (default: all cores)
    cache_dir: Path | None = None  # reference cache (default: cache_root()/eval)

    def resolved_cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else cache_root() / "eval"


@dataclass(frozen=True)
class EvalText:
    path: Path
    text: str  # as llama.cpp reads it: the file's UTF-8 text less one trailing newline
    sha256: str  # of the file's bytes


@dataclass
class EvalResult:
    quality: QualityInfo
    warnings: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- inputs


def load_text(path: Path | None) -> EvalText:
    """The evaluation text; None means the demo evaluation text."""
    if path is None:
        from mergeq.demo import demo_assets

        path = demo_assets().eval_text
    path = Path(path)
    if not path.is_file():
        raise MergeqError(f"evaluation text {path} does not exist or is not a file", hint="pass --text FILE")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MergeqError(f"evaluation text {path} is not UTF-8 (bad byte at offset {err.start})",
                          hint="convert the file to UTF-8") from err
    if text.endswith("\n"):
        text = text[:-1]  # llama.cpp's -f drops one trailing newline; so do we
    return EvalText(path=path, text=text, sha256=hashlib.sha256(data).hexdigest())


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
    config = _read_config(artifact)
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method is None:
        return "hf"
    if method in INT4_METHODS:
        return "int4"
    raise MergeqError(f"artifact {artifact}: quantization method {method!r} cannot be evaluated",
                      hint=f"mergeq evaluates plain checkpoints, GGUF files and {', '.join(INT4_METHODS)} directories")


def _read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise MergeqError(f"{directory} has no config.json", hint="pass a Hugging Face checkpoint directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise MergeqError(f"{path} is not valid JSON: {err}", hint="the checkpoint is corrupted; re-export it") from err


def check_checkpoint(directory: Path) -> None:
    """Validate every safetensors header of a checkpoint (names the file on a truncated or damaged one)."""
    from merge.checkpoint import read_safetensors_header

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
    from merge.checkpoint import read_safetensors_header

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
    q = _read_config(artifact)["quantization_config"]
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


def text_windows(reference: Path, text: EvalText, options: EvalOptions) -> Windows:
    ids, bos = tokenize(load_tokenizer(reference), text.text)
    return make_windows(ids, options.n_ctx, options.max_windows, bos, source=str(text.path))


# --------------------------------------------------------------------------------------- torch models


def load_torch_model(artifact: Path, kind: str):
    """An fp32 torch model of the artifact as written on disk ("hf" or "int4" directories)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    artifact = Path(artifact)
    try:
        if kind == "hf":
            check_checkpoint(artifact)
            model = AutoModelForCausalLM.from_pretrained(str(artifact), dtype=torch.float32)
        elif kind == "int4":
            from exporters.int4.formats import dequantized_state_dict

            check_checkpoint(artifact)
            state = dequantized_state_dict(artifact, dtype=torch.float32)
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
            model = load_torch_model(reference, "hf")
            with atomic_dir(entry) as tmp:
                for i, lp in torch_logprobs(model, windows, _batch(options), f"reference {Path(reference).name}"):
                    save_file({"logprobs": lp.contiguous()}, str(tmp / f"window-{i:04d}.safetensors"))
                write_json(tmp / "meta.json", {**key_data, "reference_path": str(reference),
                                               "windows": windows.n_windows})
            del model
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


@dataclass
class LlamaLogprobs:
    """What `llama-perplexity --kl-divergence-base` wrote: tokens and quantized log-probs per scored position."""

    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # int32 [n_chunk * n_ctx]
    _blocks: np.ndarray  # uint16 [n_chunk, scored, row]

    def window(self, i: int, reference: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 log-probabilities [scored, n_vocab], dequantized as llama.cpp does (scale * q + min).

        llama.cpp keeps a band of 16 nats below each position's top token; a token below it is stored at the
        band's bottom, so only "at or below the bottom" is known. Given the reference's log-probabilities,
        such a token takes the lower of the bottom and the reference's value: where the reference puts it in
        the tail too, no divergence is claimed that cannot be measured (the bottom itself would make KL
        negative); where the reference gives it real probability, the bottom bounds the divergence from below.
        """
        block = np.asarray(self._blocks[i])
        params = np.ascontiguousarray(block[:, :4]).view(np.float32)  # [scored, 2]: scale, min log-prob
        q = block[:, 4 : 4 + self.n_vocab]
        lp = torch.from_numpy(q.astype(np.float32) * params[:, :1] + params[:, 1:2])
        if reference is None:
            return lp
        clamped = torch.from_numpy((q == 0) & (params[:, :1] * 65535 >= LLAMA_BAND_NATS * (1 - 1e-4)))
        return torch.where(clamped, torch.minimum(lp, reference.to(torch.float32)), lp)


def read_llama_logprobs(path: Path) -> LlamaLogprobs:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(20)
    if len(head) < 20 or head[:8] != LLAMA_LOGITS_MAGIC:
        raise ToolError(f"llama-perplexity wrote no log-probabilities to {path}", hint="rerun with -v to see its output")
    n_ctx, n_vocab, n_chunk = np.frombuffer(head[8:20], dtype="<i4").tolist()
    scored = n_ctx - 1 - n_ctx // 2
    row = 2 * ((n_vocab + 1) // 2) + 4
    offset = 20 + 4 * n_chunk * n_ctx
    expected = offset + 2 * n_chunk * scored * row
    if size != expected:
        raise ToolError(f"llama-perplexity's log-probability file {path} has {size} bytes, expected {expected}",
                        hint="the run was interrupted; rerun the evaluation")
    tokens = np.fromfile(path, dtype="<i4", count=n_chunk * n_ctx, offset=20)
    blocks = np.memmap(path, dtype="<u2", mode="r", offset=offset, shape=(n_chunk, scored, row))
    return LlamaLogprobs(n_ctx, n_vocab, n_chunk, tokens, blocks)


_PPL_FINAL = re.compile(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf)")
_PPL_RUNNING = re.compile(r"\[(\d+)\]([0-9.eE+-]+|nan|inf),")


def parse_perplexity_output(output: str) -> float | None:
    """llama-perplexity's final perplexity from its log (the last running value if no final line)."""
    found = _PPL_FINAL.findall(output)
    if found:
        return float(found[-1])
    running = _PPL_RUNNING.findall(output)
    return float(running[-1][1]) if running else None


def run_llama_perplexity(gguf: Path, text: EvalText, windows: Windows, options: EvalOptions, out: Path) -> tuple[float | None, str]:
    """Run llama-perplexity over the same windows, saving the artifact's log-probabilities to `out`."""
    from exporters import llamacpp

    n_ctx = windows.n_ctx
    threads = options.threads or os.cpu_count() or 1
    command = llamacpp.tool_command(
        "llama-perplexity", "-m", gguf, "-f", text.path, "-c", n_ctx, "-b", n_ctx * max(1, 2048 // n_ctx),
        "--chunks", windows.n_windows, "-t", threads, "--kl-divergence-base", out)
    log.info("running %s", " ".join(command.argv))
    result = llamacpp.run_tool(command, hint=f"if {gguf} is damaged, export it again")
    output = result.stdout + "\n" + result.stderr
    return parse_perplexity_output(output), output


def llama_version() -> dict:
    from exporters import llamacpp

    return llamacpp.version_info()


# ------------------------------------------------------------------------------------------ evaluate


def evaluate(artifact: Path, reference: Path, text: Path | None, settings: EvalOptions | None = None) -> QualityInfo:
    """Quality of `artifact` against `reference` on `text` (None: the demo evaluation text)."""
    result = evaluate_full(artifact, reference, text, settings)
    for warning in result.warnings:
        log.warning("%s", warning)
    return result.quality


def evaluate_into_report(report: ArtifactReport, reference: Path, text: Path | None,
                         settings: EvalOptions | None = None) -> None:
    """Fill report.quality, add the cost to report.stages["eval"], record provenance and warnings."""
    with measure_stage(report, "eval"):
        result = evaluate_full(Path(report.path), Path(reference), text, settings)
    report.quality = result.quality
    report.provenance["eval"] = result.provenance
    for warning in result.warnings:
        log.warning("%s: %s", report.path, warning)
        if warning not in report.warnings:
            report.warnings.append(warning)


def evaluate_full(artifact: Path, reference: Path, text: Path | None, settings: EvalOptions | None = None) -> EvalResult:
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
    eval_text = load_text(text)
    windows = text_windows(reference, eval_text, options)
    warnings: list[str] = []
    provenance = {
        "text": str(eval_text.path), "text_sha256": eval_text.sha256, "reference": str(reference),
        "reference_sha256": checkpoint_fingerprint(reference), "n_ctx": windows.n_ctx,
        "windows": windows.n_windows, "text_tokens": windows.text_tokens, "versions": _versions(),
    }
    if kind == "gguf":
        sums, perplexity, evaluator = _evaluate_gguf(artifact, reference, eval_text, windows, options, warnings, provenance)
    else:
        sums = _evaluate_torch(artifact, kind, reference, windows, options)
        perplexity, evaluator = sums.perplexity, "torch"
    for name, value in (("perplexity", perplexity), ("KL divergence", sums.kl_divergence)):
        if not math.isfinite(value):
            raise MergeqError(f"{artifact} gives a non-finite {name} ({value})",
                              hint="the artifact's weights are damaged or overflow; export it again")
    quality = QualityInfo(
        perplexity=perplexity, reference_perplexity=sums.reference_perplexity, kl_divergence=sums.kl_divergence,
        top1_agreement=sums.top1_agreement, eval_tokens=sums.count, text_sha256=eval_text.sha256,
        context_length=windows.n_ctx, evaluator=evaluator, windows=windows.n_windows, text_tokens=windows.text_tokens)
    return EvalResult(quality, warnings, provenance)


def _evaluate_torch(artifact: Path, kind: str, reference: Path, windows: Windows, options: EvalOptions) -> MetricSums:
    ref = reference_logprobs(reference, windows, options)
    sums = MetricSums()
    if kind == "hf" and artifact.resolve() == reference.resolve():
        for i in range(windows.n_windows):
            lp = ref.window(i)
            sums.add(lp, lp, windows.targets[i])
        return sums
    model = load_torch_model(artifact, kind)
    for i, lp in torch_logprobs(model, windows, _batch(options), artifact.name):
        sums.add(ref.window(i), lp, windows.targets[i])
    return sums


def _evaluate_gguf(artifact, reference, eval_text, windows, options, warnings, provenance):
    gguf_vocab = check_gguf(artifact).array_lengths.get("tokenizer.ggml.tokens", 0)
    with tempfile.TemporaryDirectory(prefix="mergeq-eval-") as tmp:
        out = Path(tmp) / "logprobs.bin"
        printed, output = run_llama_perplexity(artifact, eval_text, windows, options, out)
        llama = read_llama_logprobs(out)
        provenance["llama.cpp"] = llama_version()
        if llama.n_ctx != windows.n_ctx or llama.n_chunk > windows.n_windows:
            raise ToolError(f"llama-perplexity on {artifact} used n_ctx {llama.n_ctx} and {llama.n_chunk} windows, "
                            f"mergeq asked for {windows.n_ctx} and {windows.n_windows}")
        ids_llama = torch.from_numpy(llama.tokens.astype(np.int64)).view(llama.n_chunk, windows.n_ctx)
        win = _windows_as_llama(windows, ids_llama, warnings)
        if gguf_vocab and gguf_vocab != llama.n_vocab:
            warnings.append(f"GGUF vocabulary has {gguf_vocab} tokens, llama.cpp scored {llama.n_vocab}")
        ref = reference_logprobs(reference, win, options)
        sums = MetricSums()
        for i in track(range(llama.n_chunk), f"eval {artifact.name}"):
            ref_lp = ref.window(i)
            if ref_lp.shape[-1] != llama.n_vocab:
                raise MergeqError(
                    f"{artifact} has a vocabulary of {llama.n_vocab} tokens, the reference {reference} "
                    f"{ref_lp.shape[-1]}", hint="evaluate the GGUF against the checkpoint it was converted from")
            sums.add(ref_lp, llama.window(i, ref_lp), win.targets[i])
    if printed is None:
        warnings.append("llama-perplexity printed no perplexity; it is computed from its saved log-probabilities")
        perplexity = sums.perplexity
    else:
        perplexity = printed
        if abs(math.log(printed) - math.log(sums.perplexity)) > 0.01:
            warnings.append(f"llama-perplexity printed PPL {printed:.4f} but its saved log-probabilities give "
                            f"{sums.perplexity:.4f}")
    return sums, perplexity, "llama.cpp"


def _windows_as_llama(windows: Windows, ids_llama: torch.Tensor, warnings: list[str]) -> Windows:
    """The windows llama.cpp evaluated; warn if its tokenization differs from the reference tokenizer's."""
    n = ids_llama.shape[0]
    if n < windows.n_windows:
        warnings.append(f"llama.cpp tokenized the text into fewer tokens than the reference tokenizer: "
                        f"{n} windows instead of {windows.n_windows}")
    theirs = ids_llama.clone()
    if windows.bos_id is not None:
        theirs[:, 0] = windows.bos_id  # llama.cpp saves the original first tokens, but evaluates BOS there
    ours = windows.tokens[:n]
    if torch.equal(ours, theirs):
        if n == windows.n_windows:
            return windows
        return Windows(ours, windows.targets[:n], windows.n_ctx, windows.text_tokens, windows.bos_id)
    where = int((ours.flatten() != theirs.flatten()).nonzero()[0, 0])
    warnings.append(f"llama.cpp tokenizes the evaluation text differently from the reference tokenizer "
                    f"(first difference at token {where}); the GGUF is scored on llama.cpp's tokens, and the "
                    "reference log-probabilities are computed on those same tokens")
    first = first_scored(windows.n_ctx)
    return Windows(theirs, ids_llama[:, first + 1 :].clone(), windows.n_ctx, windows.text_tokens, windows.bos_id)


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
