"""Evaluation and merge validation one decoder layer at a time (mergeq/core/streaming.py) give the numbers of
the whole-model path, for plain checkpoints, every int4 format and every supported family; the streamed
validation still flags a wrong merge."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from int4_models import calibration_text, int4_options, tiny_model
from test_evaluate import eval_text, perturbed_copy, tiny_tokenizer
from tiny_models import make_adapter, tiny_llama

from exporters.eval_options import EvalOptions
from exporters.evaluate import evaluate
from merge.merger import AdapterRef, MergeConfig, run_merge
from merge.validate import Reference, compare_candidates

REL = 1e-6


def _same(a, b) -> None:
    for key in ("perplexity", "reference_perplexity", "kl_divergence", "top1_agreement"):
        x, y = getattr(a, key), getattr(b, key)
        assert x == pytest.approx(y, rel=REL, abs=1e-12), (key, x, y)


def _both(artifact, reference, text, root, **kw):
    """(streamed, whole-model) quality, each with its own reference cache."""
    out = []
    for streaming in (True, False):
        options = EvalOptions(streaming=streaming, cache_dir=root / f"cache-{streaming}", **kw)
        out.append(evaluate(artifact, reference, text, options))
    return out


def test_streamed_evaluation_equals_whole_model_for_hf_checkpoints(tmp_path):
    ref = tiny_llama(tmp_path / "ref", dtype=torch.float16, seed=3, layers=3)
    tiny_tokenizer(ref, add_bos=True)
    text = eval_text(tmp_path / "eval.txt", 300)
    tied = tiny_llama(tmp_path / "tied", dtype=torch.float16, seed=4, tie=True)
    tiny_tokenizer(tied, add_bos=True)
    artifact = perturbed_copy(ref, tmp_path / "noisy", 0.05)
    streamed, whole = _both(artifact, ref, text, tmp_path, n_ctx=32, max_windows=5, batch_windows=2)
    _same(streamed, whole)
    assert streamed.kl_divergence > 0 and streamed.eval_tokens == 5 * 15
    streamed, whole = _both(tied, tied, text, tmp_path / "t", n_ctx=32, max_windows=4)
    _same(streamed, whole)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("method,fmt", [("gptq", "native"), ("awq", "native"), ("rtn", "compressed-tensors")])
def test_streamed_evaluation_equals_whole_model_for_int4(tmp_path, family, method, fmt):
    from exporters.int4.export import export_int4

    base = tiny_model(tmp_path / "base", family, layers=2)
    text = calibration_text(tmp_path / "eval.txt", chars=6000)
    out = tmp_path / "q"
    export_int4(
        base, out, int4_options(method, format=fmt, calib=text, samples=4, seq_len=32, group_size=32, device="cpu")
    )
    streamed, whole = _both(out, base, text, tmp_path, n_ctx=64, max_windows=4)
    _same(streamed, whole)
    assert streamed.kl_divergence > 0  # the int4 weights were really read (not the reference's)


def test_streamed_evaluation_reads_one_layer_at_a_time(tmp_path, monkeypatch):
    """The streamed path never builds a whole model and reads each decoder layer once."""
    import exporters.eval_torch as et
    from mergeq.core.skeleton import Skeleton

    ref = tiny_llama(tmp_path / "ref", dtype=torch.float16, seed=3, layers=4)
    tiny_tokenizer(ref, add_bos=True)
    text = eval_text(tmp_path / "eval.txt", 200)
    monkeypatch.setattr(et, "load_torch_model", lambda *a: pytest.fail("whole model loaded"))
    built = []
    real = Skeleton.load_layer
    monkeypatch.setattr(Skeleton, "load_layer", lambda self, i, **kw: built.append(i) or real(self, i, **kw))
    quality = evaluate(ref, ref, text, EvalOptions(n_ctx=32, max_windows=4, cache_dir=tmp_path / "c"))
    assert built == [0, 1, 2, 3] and quality.kl_divergence == 0


# ------------------------------------------------------------------------------------------- validation


def _validation(tmp_path, refs, merged, *, streaming):
    reference = Reference(base=tmp_path / "base", adapters=refs, vocab_size=96)
    return compare_candidates(reference, {"base": merged}, kl_warn=1e-6, logit_warn=1e-3, streaming=streaming).results[
        "base"
    ]


def test_streamed_validation_equals_whole_model_and_flags_a_wrong_merge(tmp_path):
    base = tiny_llama(tmp_path / "base", layers=3)
    a = make_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=12, target_modules=["q_proj", "up_proj"])
    b = make_adapter(
        base,
        tmp_path / "b",
        seed=2,
        r=8,
        lora_alpha=4,
        use_dora=True,
        use_rslora=True,
        target_modules=["v_proj", "down_proj"],
    )
    refs = [AdapterRef(a, 0.7), AdapterRef(b, 1.0)]
    result = run_merge(MergeConfig(base=base, adapters=refs, out=tmp_path / "o", dtype="float32"))
    good = result.manifest["validation"]
    assert good["reference"].endswith("layer by layer") and good["ok"], good
    assert good["mean_kl"] < 1e-9 and good["max_abs_logit_delta"] < 1e-4
    whole = _validation(tmp_path, refs, tmp_path / "o", streaming=False)
    assert whole["mean_kl"] == pytest.approx(good["mean_kl"], abs=1e-12)
    assert whole["max_abs_logit_delta"] == pytest.approx(good["max_abs_logit_delta"], abs=1e-6)

    # a wrong merge: the adapter's delta left out of one linear of the last layer
    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "o", wrong)
    from safetensors.torch import load_file, save_file

    (shard,) = wrong.glob("model-*.safetensors")
    state = load_file(str(shard))
    name = "model.layers.2.mlp.down_proj.weight"
    clean = load_file(str(base / "model.safetensors"))[name]
    assert not torch.equal(state[name], clean.to(state[name].dtype))
    state[name] = clean.to(state[name].dtype)
    save_file(state, str(shard), metadata={"format": "pt"})
    for streaming in (True, False):
        flagged = _validation(tmp_path, refs, wrong, streaming=streaming)
        assert flagged["ok"] is False and flagged["mean_kl"] > 1e3 * max(good["mean_kl"], 1e-12), flagged
    # and the weights matter: the right merge checked against other adapter weights is flagged too
    assert (
        _validation(tmp_path, [AdapterRef(a, 1.0), AdapterRef(b, 1.0)], tmp_path / "o", streaming=True)["ok"] is False
    )


def test_validation_falls_back_to_whole_models_outside_the_layers(tmp_path):
    """An adapter with modules_to_save on lm_head: validated with whole models, still exact."""
    base = tiny_llama(tmp_path / "base")
    adapter = make_adapter(
        base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    result = run_merge(MergeConfig(base=base, adapters=[adapter], out=tmp_path / "o", dtype="float32"))
    validation = result.manifest["validation"]
    assert "layer by layer" not in validation["reference"] and validation["ok"], validation


def test_streamed_validation_runs_from_the_cli_on_a_qwen2_base(tmp_path):
    """Another family through `mergeq merge` (streamed validation on a family with q/k/v biases)."""
    from mergeq.cli import main

    base = tiny_model(tmp_path / "base", "qwen2", layers=2)
    adapter = make_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"])
    assert main(["-q", "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "o")]) == 0
    validation = json.loads((tmp_path / "o" / "merge_manifest.json").read_text())["validation"]
    assert validation["reference"].endswith("layer by layer") and validation["ok"], validation
    assert validation["prompt_source"].startswith("tokenizer") and validation["mean_kl"] < 1e-5  # fp16 output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CPU path is tested above")
def test_streamed_evaluation_on_cuda_matches_cpu(tmp_path):
    ref = tiny_llama(tmp_path / "ref", dtype=torch.float16, seed=3, layers=3)
    tiny_tokenizer(ref, add_bos=True)
    text = eval_text(tmp_path / "eval.txt", 300)
    artifact = perturbed_copy(ref, tmp_path / "noisy", 0.05)
    cpu = evaluate(artifact, ref, text, EvalOptions(n_ctx=32, max_windows=4, cache_dir=tmp_path / "cpu"))
    gpu = evaluate(artifact, ref, text, EvalOptions(n_ctx=32, max_windows=4, cache_dir=tmp_path / "gpu", device="cuda"))
    for key in ("perplexity", "reference_perplexity", "kl_divergence"):
        assert getattr(gpu, key) == pytest.approx(getattr(cpu, key), rel=1e-4, abs=1e-7), key


@pytest.mark.demo
def test_streamed_evaluation_matches_whole_model_on_the_demo(tmp_path):
    """The demo base (SmolLM2-135M, tied embeddings) and its RTN int4 export: the streamed numbers equal
    today's whole-model numbers to 1e-6 relative."""
    from exporters.int4.export import Int4Options, export_int4
    from mergeq.demo import demo_base
    from mergeq.demo_texts import build_texts

    base = demo_base()
    text = tmp_path / "eval.txt"
    text.write_text(build_texts().eval, encoding="utf-8")
    rtn = tmp_path / "rtn"
    export_int4(base, rtn, Int4Options(method="rtn", group_size=64, device="cpu"))
    for artifact in (base, rtn):
        streamed, whole = _both(artifact, base, text, tmp_path / artifact.name, max_windows=4)
        _same(streamed, whole)
        assert streamed.eval_tokens == 4 * 255
    assert streamed.kl_divergence > 0


def test_validation_keeps_16_bit_linears_as_stored_with_the_same_numbers(tmp_path):
    """Validation builds each layer with its linear weights in the file's fp16 (views of the file map) and casts
    one linear at a time to fp32 while it computes: the outputs are bit for bit the fp32 layer's, and with DoRA
    and a weighted adapter on an fp16 base the numbers equal the whole-model path's."""
    from mergeq.core import streaming as st

    base = tiny_llama(tmp_path / "base", dtype=torch.float16, seed=5, layers=2)
    weights = st.CheckpointWeights(base)
    model = st.StreamedModel(weights, json.loads((base / "config.json").read_text()), torch.device("cpu"))
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    (h,), calls = model.skeleton.capture(ids, 2)
    fp32 = model.skeleton.load_layer(1)
    stored = model.skeleton.load_layer(1, linears_as_stored=True)
    linears = [m for m in stored.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float16 for m in linears)
    q_proj = weights.checkpoint.view("model.layers.1.self_attn.q_proj.weight")[0]
    assert stored.self_attn.q_proj.weight.data_ptr() == q_proj.data_ptr()  # read in place from the file map
    weights.close()  # the layer's views keep the map
    with torch.inference_mode():
        assert torch.equal(calls[1][0](stored, h), calls[1][0](fp32, h))
    assert all(m.weight.dtype == torch.float16 for m in linears)  # the stored weight is back after the call

    dora = make_adapter(
        base, tmp_path / "a", seed=3, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]
    )
    lora = make_adapter(base, tmp_path / "b", seed=4, r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"])
    refs = [AdapterRef(dora, 1.0), AdapterRef(lora, 0.6)]
    result = run_merge(MergeConfig(base=base, adapters=refs, out=tmp_path / "o", dtype="float16"))
    streamed = result.manifest["validation"]
    assert streamed["reference"].endswith("layer by layer") and streamed["ok"], streamed
    whole = _validation(tmp_path, refs, tmp_path / "o", streaming=False)
    assert whole["mean_kl"] == pytest.approx(streamed["mean_kl"], rel=1e-6, abs=1e-12)
    assert whole["max_abs_logit_delta"] == pytest.approx(streamed["max_abs_logit_delta"], rel=1e-6, abs=1e-9)
