"""Log-probabilities of a checkpoint computed by torch in fp32: Hugging Face directories as transformers loads
them, int4 directories (AWQ / GPTQ / compressed-tensors) unpacked by our own reader (`exporters.int4.formats`);
the whole model in memory, or one decoder layer at a time (mergeq/core/streaming.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from exporters.eval_inputs import check_checkpoint
from exporters.eval_options import EvalOptions
from mergeq.core.errors import MergeqError
from mergeq.core.metrics import Windows, check_finite, first_scored, log_probs
from mergeq.core.modelfiles import read_model_config
from mergeq.core.progress import track

log = logging.getLogger(__name__)


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
                    f"unexpected {unexpected[:5]}",
                    hint="the artifact is damaged or was written by another tool",
                )
            if tied:
                model.tie_weights()
        else:
            raise ValueError(kind)
    except MergeqError:
        raise
    except Exception as err:
        raise MergeqError(
            f"cannot load {artifact}: {type(err).__name__}: {err}",
            hint="the checkpoint is damaged or incomplete; export it again",
        ) from err
    model.eval()
    return model


def model_logprobs(
    artifact: Path, kind: str, windows: Windows, options: EvalOptions, label: str
) -> Iterator[tuple[int, torch.Tensor]]:
    """(window index, fp32 log-probabilities [scored, vocab]) of a checkpoint ("hf" or "int4") for every window.

    Streamed one decoder layer at a time (mergeq/core/streaming.py) when options.streaming is on and the stream
    takes the model (every decoder-only ...ForCausalLM family, see streaming.unsupported_reason); otherwise the
    whole model is loaded (the reference implementation)."""
    from mergeq.core import streaming

    why = streaming.unsupported_reason(read_model_config(artifact)) if options.streaming else None
    if options.streaming and why is None:
        yield from streamed_logprobs(artifact, kind, windows, options, label)
        return
    if options.streaming:
        log.info("%s: %s; evaluating the whole model in memory", artifact, why)
    model = load_torch_model(artifact, kind)
    yield from torch_logprobs(model, windows, _batch(options), label)


def streamed_logprobs(
    artifact: Path, kind: str, windows: Windows, options: EvalOptions, label: str
) -> Iterator[tuple[int, torch.Tensor]]:
    """model_logprobs, one decoder layer in memory at a time, on options.device."""
    from exporters.streaming import streamed
    from mergeq.core import streaming
    from mergeq.core.device import resolve_device

    check_checkpoint(artifact)
    device = resolve_device(options.device)
    scored = slice(first_scored(windows.n_ctx), windows.n_ctx - 1)
    try:
        with streamed(artifact, kind, device) as model:
            hidden = streaming.final_hidden(
                model, windows.tokens.to(device), scored, _batch(options), progress=f"eval {label} layers"
            )
            for start, logits in streaming.logits_blocks(model, hidden):
                check_finite(logits, label)
                for j in range(logits.shape[0]):
                    yield start + j, log_probs(logits[j]).cpu()
    except MergeqError:
        raise
    except Exception as err:
        raise MergeqError(
            f"cannot evaluate {artifact}: {type(err).__name__}: {err}",
            hint="the checkpoint is damaged or incomplete; export it again",
        ) from err


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


def _batch(options: EvalOptions) -> int:
    return max(1, options.batch_windows)
