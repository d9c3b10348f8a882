"""Evaluation and merge validation one decoder layer at a time for every family (tests/family_models.py), not only
the Llama-like three: the streamed numbers equal the whole-model numbers, and the streamed path is the one taken
(no whole model is built; every decoder layer is loaded once, alone).

Gemma 2 and 3 have sliding and global layers with a window (4) shorter than the inputs, tied embeddings, Gemma's
(1 + w) norms and scaled embedding, and Gemma 2 soft-caps its final logits; Phi-3 has fused qkv_proj and gate_up_proj;
Mixtral and Qwen3-MoE store their experts per expert on disk and fused in memory.
"""

from __future__ import annotations

import pytest
import torch
from family_models import EXPERT_PARAMETERS, LINEAR_TARGETS, MOE_FAMILIES, family_config, family_model
from test_evaluate import eval_text, perturbed_copy, tiny_tokenizer
from tiny_models import make_adapter

from exporters.eval_options import EvalOptions
from exporters.evaluate import evaluate
from merge.merger import AdapterRef, MergeConfig, run_merge
from merge.validate import Reference, compare_candidates
from mergeq.core import streaming
from mergeq.core.skeleton import Skeleton

FAMILIES = ["qwen3", "gemma2", "gemma3", "phi3", "olmo2", "mixtral", "qwen3_moe"]
REL = 1e-6
VALIDATION_REL = 1e-5  # the manifest rounds validation numbers to 6 significant digits: one step of that


def guard_streamed(monkeypatch) -> list[int]:
    """Fails the test if a whole model is loaded (evaluation or validation); returns the list of decoder layers
    built, in order. monkeypatch.undo() lifts the guard."""
    import exporters.eval_torch as et
    import merge.validate as mv

    monkeypatch.setattr(et, "load_torch_model", lambda *a: pytest.fail("whole model loaded for evaluation"))
    monkeypatch.setattr(mv, "_load", lambda *a, **k: pytest.fail("whole model loaded for validation"))
    monkeypatch.setattr(mv, "reference_model", lambda *a: pytest.fail("whole PEFT model loaded for validation"))
    built: list[int] = []
    real = Skeleton.load_layer
    monkeypatch.setattr(
        Skeleton, "load_layer", lambda self, index, **kw: built.append(index) or real(self, index, **kw)
    )
    return built


def test_every_family_is_streamed_with_a_stated_exception():
    for family in FAMILIES:
        config = family_config(family).to_dict()
        config["architectures"] = [type_name(family)]
        assert streaming.unsupported_reason(config) is None, family
    # a MoE family whose experts' layout on disk is not known, and a model class that is not a causal LM: refused
    moe = {"architectures": ["SomeMoeForCausalLM"], "num_experts": 8}
    assert "expert layout" in streaming.unsupported_reason(moe)
    assert "ForCausalLM" in streaming.unsupported_reason({"architectures": ["Gemma3ForConditionalGeneration"]})


def test_decoder_layers_is_the_one_list_of_num_hidden_layers_modules():
    """The layer finder the stream, the int4 engine and its preflight share: the ModuleList named `...layers`
    that holds num_hidden_layers modules (not the first list so named); none or several are refused."""
    from types import SimpleNamespace

    from torch import nn

    from mergeq.core.errors import MergeqError
    from mergeq.core.skeleton import decoder_layers

    def modules(n):
        return nn.ModuleList(nn.Identity() for _ in range(n))

    model = nn.Module()
    model.config = SimpleNamespace(num_hidden_layers=3)
    model.vision = nn.Module()
    model.vision.layers = modules(2)  # registered first, but not num_hidden_layers long
    model.model = nn.Module()
    model.model.layers = modules(3)
    assert decoder_layers(model) == ("model.layers", model.model.layers)
    model.extra_layers = modules(3)
    with pytest.raises(MergeqError, match=r"^some/folder: cannot tell .* \(2 lists of 3 modules\)"):
        decoder_layers(model, "some/folder")
    del model.extra_layers, model.model
    with pytest.raises(MergeqError, match=r"\(0 lists of 3 modules\)"):
        decoder_layers(model)


def type_name(family: str) -> str:
    from family_models import FAMILIES as ALL

    return ALL[family][1]


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_evaluation_equals_whole_model(tmp_path, family, monkeypatch):
    ref = family_model(tmp_path / "ref", family, dtype=torch.float16, seed=3)
    tiny_tokenizer(ref, add_bos=True)
    artifact = perturbed_copy(ref, tmp_path / "noisy", 0.05)
    text = eval_text(tmp_path / "eval.txt", 200)
    layers = family_config(family).num_hidden_layers

    def quality(streaming: bool):
        options = EvalOptions(
            n_ctx=32, max_windows=4, batch_windows=2, streaming=streaming, cache_dir=tmp_path / f"c-{streaming}"
        )
        return evaluate(artifact, ref, text, options)

    built = guard_streamed(monkeypatch)
    streamed = quality(True)
    assert built == list(range(layers)) * 2  # the reference, then the artifact: each layer once, in order
    monkeypatch.undo()
    whole = quality(False)
    for key in ("perplexity", "reference_perplexity", "kl_divergence", "top1_agreement"):
        assert getattr(streamed, key) == pytest.approx(getattr(whole, key), rel=REL, abs=1e-12), key
    assert streamed.kl_divergence > 1e-4 and streamed.top1_agreement < 1  # the artifact differs: numbers that count


def _validation(base, refs, merged, *, streaming):
    reference = Reference(base=base, adapters=refs, vocab_size=96)
    outcome = compare_candidates(reference, {"m": merged}, kl_warn=1e-6, logit_warn=1e-3, streaming=streaming)
    return outcome.results["m"]


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_validation_equals_whole_model(tmp_path, family, monkeypatch):
    base = family_model(tmp_path / "base", family)
    extra = {"target_parameters": EXPERT_PARAMETERS} if family in MOE_FAMILIES else {}
    adapter = make_adapter(
        base, tmp_path / "a", seed=1, r=4, lora_alpha=12, target_modules=LINEAR_TARGETS[family], **extra
    )
    refs = [AdapterRef(adapter, 1.0)]
    layers = family_config(family).num_hidden_layers
    built = guard_streamed(monkeypatch)

    result = run_merge(MergeConfig(base=base, adapters=refs, out=tmp_path / "o", dtype="float32"))
    good = result.manifest["validation"]
    assert good["reference"].endswith("layer by layer") and good["ok"], good
    assert built == list(range(layers)) * 2  # the PEFT reference, then the merged checkpoint
    # the base itself as the "merge": a wrong merge, flagged, with numbers far from zero to compare
    wrong = _validation(base, refs, base, streaming=True)
    assert wrong["ok"] is False and wrong["mean_kl"] > 1e-4, wrong

    monkeypatch.undo()
    whole_good = _validation(base, refs, tmp_path / "o", streaming=False)
    whole_wrong = _validation(base, refs, base, streaming=False)
    assert whole_wrong["mean_kl"] == pytest.approx(wrong["mean_kl"], rel=VALIDATION_REL)
    assert whole_wrong["max_abs_logit_delta"] == pytest.approx(wrong["max_abs_logit_delta"], rel=VALIDATION_REL)
    assert whole_good["mean_kl"] == pytest.approx(good["mean_kl"], abs=1e-12)
    assert whole_good["max_abs_logit_delta"] == pytest.approx(good["max_abs_logit_delta"], abs=1e-5)


@pytest.mark.parametrize(
    "family,method", [("gemma3", "gptq"), ("phi3", "awq"), ("mixtral", "gptq"), ("qwen3_moe", "rtn")]
)
def test_streamed_evaluation_of_int4_exports_equals_whole_model(tmp_path, family, method, monkeypatch):
    """The int4 linears (and a MoE family's per-expert int4 tensors) unpacked one layer at a time from the files
    as written give the numbers of the whole dequantized model."""
    from int4_models import byte_tokenizer, calibration_text, int4_options

    from exporters.int4.export import export_int4

    base = family_model(tmp_path / "base", family, dtype=torch.float16, vocab=256)
    byte_tokenizer(base)
    text = calibration_text(tmp_path / "text.txt", chars=4000)
    out = tmp_path / "q"
    export_int4(base, out, int4_options(method, calib=text, samples=4, seq_len=32, group_size=32, device="cpu"))
    layers = family_config(family).num_hidden_layers

    def quality(streaming: bool):
        options = EvalOptions(n_ctx=64, max_windows=3, streaming=streaming, cache_dir=tmp_path / f"c-{streaming}")
        return evaluate(out, base, text, options)

    built = guard_streamed(monkeypatch)
    streamed = quality(True)
    assert built == list(range(layers)) * 2
    monkeypatch.undo()
    whole = quality(False)
    for key in ("perplexity", "reference_perplexity", "kl_divergence", "top1_agreement"):
        assert getattr(streamed, key) == pytest.approx(getattr(whole, key), rel=REL, abs=1e-12), key
    assert streamed.kl_divergence > 0  # the int4 weights were read, not the reference's
