"""Built-in validation: the merged checkpoint against the unmerged base + adapter(s) run by PEFT.

A few fixed prompts, joined into one sequence, go through both models in fp32 on the CPU; the manifest records
the largest |logit difference| and the mean KL divergence KL(reference || merged) per token. One sequence, not one
call per prompt: for a few dozen tokens a call costs about one read of the layer's weights. For a QLoRA adapter the
reference is the 4-bit base it was trained on (bitsandbytes runs on the CPU), so the numbers say how
faithful the merged checkpoint is to the model that was actually trained.

With both a 4-bit and an fp16 base (`--qlora-base` and `--base`), both merge targets are compared to that
same reference, and the closer one is chosen.

Both sides stream one decoder layer at a time (mergeq/core/streaming.py), their linear weights kept as stored
(16-bit files) and cast to fp32 one linear at a time, while it computes: the reference layer is built from the
base's tensors (4-bit bases dequantized by merge.qlora) and PEFT puts the unmerged adapter(s) into it
(`inject_adapter_in_model` on that one layer, under its full module path, so target patterns match as in the
whole model: merge/unmerged.py); the merged layer is read from the merged files. The two are independent: PEFT computes
W x + s B(A x) (or its DoRA form) from the adapter files, never mergeq's merged weights, so a wrong merge
shows. Adapters that change tensors outside the decoder layers (embeddings, lm_head: modules_to_save,
trainable tokens, resized vocabularies) and models the stream cannot take (mergeq.core.streaming.unsupported_reason:
model classes other than ...ForCausalLM, Mixture-of-Experts families without an expert layout) are validated with
whole models, as before. `--no-validate` turns validation off.

The reference's half (`reference_side`) is computed once, apart from the candidates: the merge runs it in a thread
while it streams (merge/merger.py) and hands it to `compare_candidates`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge.unmerged import UnmergedWeights, with_adapters
from mergeq.core.errors import MergeqError
from mergeq.core.modelfiles import has_tokenizer, read_json_object, read_model_config

log = logging.getLogger(__name__)

PROMPTS = (
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Explain in one sentence why the sky is blue.",
    "import os\nimport sys\n\n\ndef main():\n",
)
RANDOM_PROMPT_LENGTH = 24


@dataclass
class Reference:
    base: Path  # the base the adapters were trained on (4-bit for QLoRA)
    adapters: list  # AdapterRef
    vocab_size: int | None = None  # the merged vocabulary (resized embeddings)
    tokenizer_dirs: list[Path] = field(default_factory=list)
    quantize: object | None = None  # QuantSettings: quantize an fp16 base on load, as the QLoRA run did


@dataclass
class Outcome:
    results: dict[str, dict]
    best: str
    fidelity: dict | None
    warnings: list[str]


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def prompt_ids(tokenizer_dirs: list[Path], vocab_size: int) -> tuple[list[torch.Tensor], str]:
    """Token ids [1, L] of each fixed prompt; fixed random ids when no tokenizer fits this vocabulary."""
    for folder in tokenizer_dirs:
        if not has_tokenizer(folder):
            continue
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as err:  # noqa: BLE001
            log.debug("tokenizer in %s not usable: %s", folder, err)
            continue
        ids = [torch.tensor([tokenizer(p)["input_ids"]], dtype=torch.int64) for p in PROMPTS]
        if all(int(t.max()) < vocab_size for t in ids):
            return ids, f"tokenizer from {folder}"
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab_size, (1, RANDOM_PROMPT_LENGTH), generator=generator) for _ in PROMPTS]
    return ids, "fixed random token ids (no tokenizer)"


def _adapter_flags(path: Path) -> dict:
    config = read_json_object(Path(path) / "adapter_config.json")
    return {
        "dora": bool(config.get("use_dora")),
        "extra": bool(config.get("modules_to_save") or config.get("trainable_token_indices")),
    }


def reference_skip_reason(adapters: list) -> str | None:
    """Why PEFT cannot run exactly this combination unmerged, or None when it can."""
    if len(adapters) == 1 and adapters[0].weight == 1.0:
        return None
    flags = [_adapter_flags(a.path) for a in adapters]
    if any(f["extra"] for f in flags):
        return "PEFT runs modules_to_save / trainable tokens of only one adapter at a time at weight 1"
    if any(f["dora"] and a.weight != 1.0 for f, a in zip(flags, adapters)):
        return "PEFT has no unmerged form of a DoRA adapter at a weight other than 1"
    return None


def _load(folder: Path, quantize=None):
    from transformers import AutoModelForCausalLM

    config = read_model_config(folder)
    kwargs = {"dtype": torch.float32}
    if quantize is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantize.quant_type,
            bnb_4bit_use_double_quant=quantize.double_quant,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = "cpu"
        if quantize.blocksize != 64:
            raise MergeqError(
                f"validation: transformers quantizes with blocksize 64, not {quantize.blocksize}",
                hint="use --no-validate with another --quant-blocksize",
            )
    if config.get("quantization_config"):
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    model.eval()
    return model


def reference_model(reference: Reference):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = _load(reference.base, reference.quantize)
    if reference.vocab_size and model.get_input_embeddings().weight.shape[0] != reference.vocab_size:
        model.resize_token_embeddings(reference.vocab_size, mean_resizing=False)
    names = [f"a{i}" for i in range(len(reference.adapters))]
    peft_model = PeftModel.from_pretrained(model, str(reference.adapters[0].path), adapter_name=names[0])
    for name, adapter in zip(names[1:], reference.adapters[1:]):
        peft_model.load_adapter(str(adapter.path), adapter_name=name)
    if len(names) > 1:
        peft_model.base_model.set_adapter(names)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, adapter in zip(names, reference.adapters):
                if name in module.scaling and adapter.weight != 1.0:
                    module.scaling[name] *= adapter.weight
    peft_model.eval()
    return peft_model


def _joined(prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The prompts as one sequence [1, sum of lengths]: one forward call per layer."""
    return [torch.cat(prompts, dim=1)]


@torch.no_grad()
def logits_of(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids).logits[0].to(torch.float32) for ids in prompts]


COMPARE_POSITIONS = 16  # positions compared at once: a few [16, vocab] float64 temporaries, not [positions, vocab]


def compare(reference: list[torch.Tensor], merged: list[torch.Tensor]) -> dict:
    """Largest |logit difference| and mean KL(reference || merged) per position, in float64, over logits
    [positions, vocab] (fp32, as the models compute them), a block of positions at a time."""
    max_abs = 0.0
    kl_sum = 0.0
    positions = 0
    for ref_all, got_all in zip(reference, merged):
        if ref_all.shape != got_all.shape:
            raise MergeqError(f"validation: merged logits {tuple(got_all.shape)} vs reference {tuple(ref_all.shape)}")
        for start in range(0, ref_all.shape[0], COMPARE_POSITIONS):
            ref = ref_all[start : start + COMPARE_POSITIONS].to(torch.float64)
            got = got_all[start : start + COMPARE_POSITIONS].to(torch.float64)
            max_abs = max(max_abs, float((ref - got).abs().max()))
            log_p = torch.log_softmax(ref, dim=-1)
            log_q = torch.log_softmax(got, dim=-1)
            kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        positions += ref_all.shape[0]
    return {
        "max_abs_logit_delta": _round(max_abs),
        "mean_kl": _round(kl_sum / max(positions, 1)),
        "positions": positions,
    }


@dataclass
class ReferenceSide:
    """The reference's half of validation, computed once: its logits on the joined prompts, and how a merged
    candidate's logits are computed to compare with them (the same way: streamed, or whole models)."""

    prompts: list[torch.Tensor]  # token ids [1, L] of each prompt
    prompt_source: str
    logits: list[torch.Tensor]
    described: str
    plan: StreamPlan | None  # None: whole models

    def candidate_logits(self, folder: Path) -> list[torch.Tensor]:
        if self.plan is not None:
            return self.plan.candidate_logits(folder, _joined(self.prompts))
        return logits_of(_load(folder), _joined(self.prompts))


class Stopped(Exception):
    """The reference pass was asked to stop (the merge it runs beside failed)."""


def reference_side(
    reference: Reference, *, streaming: bool = True, device: str = "cpu", stop: threading.Event | None = None
) -> ReferenceSide:
    """The reference's logits (PEFT, unmerged adapters): one decoder layer at a time where possible (`streaming`),
    else whole models. It does not depend on the merged files, so the merge runs it beside the merge (merge/merger.py);
    `stop` set makes it raise Stopped at the next layer."""
    from mergeq.core.imports import peft_imported

    peft_imported()  # the libraries the reference runs on, imported here: 280k objects
    plan = streaming_plan(reference, device) if streaming else None
    if plan is not None:
        prompts, prompt_source = prompt_ids(reference.tokenizer_dirs, plan.vocab)
        logits = plan.reference_logits(_joined(prompts), stop)
        described = (
            "PEFT, unmerged adapter(s) on the dequantized 4-bit base, layer by layer"
            if plan.quantized
            else "PEFT, unmerged adapter(s) on the base, layer by layer"
        )
        return ReferenceSide(prompts, prompt_source, logits, described, plan)
    ref_model = reference_model(reference)
    vocab = ref_model.get_input_embeddings().weight.shape[0]
    prompts, prompt_source = prompt_ids(reference.tokenizer_dirs, vocab)
    logits = logits_of(ref_model, _joined(prompts))
    quantized = bool(getattr(ref_model.base_model.model.config, "quantization_config", None))
    del ref_model
    described = (
        "PEFT, unmerged adapter(s) on the 4-bit base (bitsandbytes, CPU)"
        if quantized
        else "PEFT, unmerged adapter(s) on the base"
    )
    return ReferenceSide(prompts, prompt_source, logits, described, None)


def compare_candidates(
    reference: Reference,
    folders: dict[str, Path],
    kl_warn: float,
    logit_warn: float,
    *,
    streaming: bool = True,
    device: str = "cpu",
    side: ReferenceSide | None = None,
) -> Outcome:
    """Validate each merged candidate folder against the PEFT reference; pick the lowest mean KL.

    `streaming`: one decoder layer at a time where possible (False: whole models, the reference
    implementation). `device`: where the streamed layers run. `side`: the reference's logits when they were
    already computed (reference_side, for this `reference`)."""
    warnings: list[str] = []
    skip = reference_skip_reason(reference.adapters)
    if skip is not None:
        if len(folders) > 1:
            raise MergeqError(f"cannot compare merge targets: {skip}", hint="pass only one base")
        label = next(iter(folders))
        warnings.append(f"validation skipped: {skip}")
        return Outcome({label: {"skipped": skip}}, label, None, warnings)
    if side is None:
        side = reference_side(reference, streaming=streaming, device=device)
    if side.plan is not None:
        from mergeq.core.streaming import unsupported_reason

        for folder in folders.values():
            merged_why = unsupported_reason(read_model_config(folder))
            if merged_why is not None:  # both sides the same way: whole models
                log.info("validation with whole models: %s: %s", folder, merged_why)
                side = reference_side(reference, streaming=False, device=device)
                break
    prompts, prompt_source, ref_logits, described = side.prompts, side.prompt_source, side.logits, side.described
    results: dict[str, dict] = {}
    for label, folder in folders.items():
        numbers = compare(ref_logits, side.candidate_logits(folder))
        numbers.update(
            {
                "reference": described,
                "prompts": len(prompts),
                "prompt_source": prompt_source,
                "thresholds": {"mean_kl": kl_warn, "max_abs_logit_delta": logit_warn},
            }
        )
        numbers["ok"] = numbers["mean_kl"] <= kl_warn and numbers["max_abs_logit_delta"] <= logit_warn
        results[label] = numbers
    best = min(results, key=lambda k: (results[k]["mean_kl"], k))
    for label, numbers in results.items():
        if not numbers["ok"] and (len(results) == 1 or label == best):
            warnings.append(
                f"merged model ({label}) differs from the unmerged reference: mean KL {numbers['mean_kl']:.4g} "
                f"(threshold {kl_warn}), max |delta logit| {numbers['max_abs_logit_delta']:.4g} "
                f"(threshold {logit_warn})"
            )
    fidelity = None
    if len(results) > 1:
        fidelity = {
            "reference": described,
            "candidates": {
                k: {"mean_kl": v["mean_kl"], "max_abs_logit_delta": v["max_abs_logit_delta"]}
                for k, v in results.items()
            },
            "chosen": best,
            "why": "lowest mean KL to the trained (4-bit base + adapter) model on the validation prompts",
        }
        log.info(
            "QLoRA merge target: %s (mean KL %s) vs %s",
            best,
            results[best]["mean_kl"],
            ", ".join(f"{k} {v['mean_kl']}" for k, v in results.items() if k != best),
        )
    return Outcome(results, best, fidelity, warnings)


# ------------------------------------------------------------------------------------------------ streamed


@dataclass
class StreamPlan:
    reference: Reference
    config: dict  # the reference base's config.json
    vocab: int
    quantized: bool
    device: torch.device

    def reference_logits(self, prompts: list[torch.Tensor], stop: threading.Event | None = None) -> list[torch.Tensor]:
        from merge.source import Source
        from mergeq.core.streaming import StreamedModel

        def hook(index: int, layer: torch.nn.Module) -> torch.nn.Module:
            if stop is not None and stop.is_set():
                raise Stopped(f"reference stopped before decoder layer {index}")
            return with_adapters(source, model.layer_prefix(index), layer)

        source = Source(
            self.reference.base, "reference", self.reference.adapters, torch.float32, self.reference.quantize
        )
        try:
            model = StreamedModel(
                UnmergedWeights(source),
                self.config,
                self.device,
                hook=hook,
                linears_as_stored=True,
            )
            try:
                return _streamed_logits(model, prompts)
            finally:
                model.close()  # its hook refers to it: freed by the garbage collector, its buffers here
        finally:
            source.close()

    def candidate_logits(self, folder: Path, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        from mergeq.core import streaming

        with streaming.streamed(streaming.CheckpointWeights(folder), self.device, linears_as_stored=True) as model:
            return _streamed_logits(model, prompts)


def streaming_plan(reference: Reference, device: str = "cpu") -> StreamPlan | None:
    """How to run the reference layer by layer, or None (with the reason logged) when only whole models can.
    The merged candidates are checked when they are compared (compare_candidates)."""
    from merge.source import Source
    from mergeq.core import streaming
    from mergeq.core.device import resolve_device
    from mergeq.core.skeleton import Skeleton

    config = read_model_config(reference.base)
    why = streaming.unsupported_reason(config)
    if why is None:
        layers_prefix = Skeleton(reference.base, None, torch.device("cpu")).prefix
        source = Source(reference.base, "reference", reference.adapters, torch.float32, reference.quantize)
        try:
            outside = sorted(n for n in source.ops if not n.startswith(layers_prefix))
            if outside:
                why = f"the adapter(s) change {', '.join(outside[:3])} outside the decoder layers"
            vocab = source.out_shapes.get(f"{source.info.input_embedding}.weight", (0,))[0]
            if reference.vocab_size and vocab != reference.vocab_size:
                why = why or f"the merged vocabulary ({reference.vocab_size}) differs from the base's ({vocab})"
            quantized = source.kind != "plain" or bool(source.requantized)
        finally:
            source.close()
    if why is not None:
        log.info("validation with whole models: %s", why)
        return None
    return StreamPlan(reference, config, int(vocab), quantized, resolve_device(device))


def _streamed_logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    from mergeq.core.streaming import final_hidden_groups, logits_blocks

    groups = [(ids, slice(None)) for ids in prompts]
    hidden = final_hidden_groups(model, groups, progress="validate layers")
    out = []
    for h in hidden:
        for _, logits in logits_blocks(model, h):
            out.append(logits[0].to(device="cpu"))  # fp32; compared in float64 a block at a time
    return out
