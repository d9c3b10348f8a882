"""The evaluator: metric definitions on hand-made numbers, llama-perplexity's windows and file format,
and whole evaluations of tiny random models (reference cache, corrupted artifacts, short texts)."""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from exporters.evaluate import (
    EvalOptions,
    _windows_as_llama,
    evaluate,
    evaluate_full,
    evaluate_into_report,
    parse_perplexity_output,
    read_llama_logprobs,
)
from exporters.metrics import MetricSums, make_windows, scored_per_window, token_metrics
from exporters.report import ArtifactReport, SizeInfo
from mergeq.errors import MergeqError

WORDS = [f"w{i}" for i in range(90)]


# ------------------------------------------------------------------------------------------ metric math


def test_metrics_on_hand_made_distributions():
    ln = math.log
    ref = torch.tensor([[ln(0.25)] * 4, [ln(0.7), ln(0.1), ln(0.1), ln(0.1)]])
    art = torch.tensor([[ln(0.5), ln(0.25), ln(0.125), ln(0.125)], [ln(0.1), ln(0.7), ln(0.1), ln(0.1)]])
    targets = torch.tensor([1, 3])
    nll, ref_nll, kl, same = token_metrics(ref, art, targets)
    assert nll.tolist() == pytest.approx([ln(4), ln(10)])
    assert ref_nll.tolist() == pytest.approx([ln(4), ln(10)])
    # KL(uniform || q) = 0.25 (ln(.25/.5) + 0 + 2 ln(.25/.125)) = 0.25 ln 2
    # KL(p || p with the first two swapped) = 0.7 ln 7 + 0.1 ln(1/7) = 0.6 ln 7
    assert kl.tolist() == pytest.approx([0.25 * ln(2), 0.6 * ln(7)])
    # argmax of a uniform row is its first index (as in llama.cpp); the second row's argmaxes differ
    assert same.tolist() == [True, False]

    sums = MetricSums()
    sums.add(ref, art, targets)
    assert sums.count == 2
    assert sums.perplexity == pytest.approx(math.exp((ln(4) + ln(10)) / 2)) == pytest.approx(math.sqrt(40))
    assert sums.kl_divergence == pytest.approx((0.25 * ln(2) + 0.6 * ln(7)) / 2)
    assert sums.top1_agreement == 0.5


def test_metrics_accumulate_over_windows_and_handle_zero_reference_probability():
    ref = torch.tensor([[0.0, -math.inf, -math.inf]])  # a reference that is certain of token 0
    art = torch.log(torch.tensor([[0.5, 0.5, 1e-30]]))
    nll, ref_nll, kl, same = token_metrics(ref, art, torch.tensor([0]))
    assert kl.item() == pytest.approx(math.log(2))  # only p > 0 contributes: 1 * ln(1 / 0.5)
    assert not torch.isnan(kl).any()
    sums = MetricSums()
    for _ in range(3):
        sums.add(ref, art, torch.tensor([0]))
    assert sums.count == 3 and sums.perplexity == pytest.approx(2.0) and sums.reference_perplexity == 1.0


def test_identical_logits_give_zero_kl_and_full_agreement():
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    lp = torch.log_softmax(logits.double(), -1)
    nll, ref_nll, kl, same = token_metrics(lp, lp, torch.arange(7))
    assert torch.equal(nll, ref_nll) and kl.abs().max() < 1e-12 and bool(same.all())


def test_mismatched_vocabularies_are_a_clear_error():
    with pytest.raises(MergeqError, match="vocabulary"):
        token_metrics(torch.zeros(2, 5), torch.zeros(2, 6), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------- llama.cpp's windows


def test_windows_mirror_llama_perplexity():
    ids = list(range(100, 205))  # 105 tokens: 10 windows of 10, 5 tokens dropped
    w = make_windows(ids, n_ctx=10, max_windows=100, bos_id=1)
    assert w.n_windows == 10 and w.text_tokens == 105
    assert scored_per_window(10) == 4  # positions 5..8 predict the tokens at 6..9
    assert w.tokens[:, 0].tolist() == [1] * 10  # each window starts with BOS
    assert w.tokens[3, 1:].tolist() == list(range(131, 140))
    assert w.targets[3].tolist() == [136, 137, 138, 139]
    assert w.scored_tokens == 40
    limited = make_windows(ids, n_ctx=10, max_windows=3, bos_id=None)
    assert limited.n_windows == 3 and limited.tokens[1, 0].item() == 110  # no BOS: first token kept


def test_fewer_than_two_windows_is_a_clear_error():
    with pytest.raises(MergeqError, match="too short.*19 tokens.*two windows of 10"):
        make_windows(list(range(19)), n_ctx=10, max_windows=16, bos_id=None, source="eval.txt")
    with pytest.raises(MergeqError, match="context length 7"):
        make_windows(list(range(100)), n_ctx=7, max_windows=16, bos_id=None)


def test_llama_tokens_that_differ_are_used_with_a_warning():
    w = make_windows(list(range(100, 140)), n_ctx=10, max_windows=4, bos_id=1)
    same = torch.tensor(list(range(100, 140))).view(4, 10)
    warnings: list[str] = []
    assert _windows_as_llama(w, same, warnings) is w and warnings == []
    other = same.clone()
    other[2, 7] = 5
    got = _windows_as_llama(w, other, warnings)
    assert "differently" in warnings[0] and "token 27" in warnings[0]
    assert got.targets[2].tolist() == [126, 5, 128, 129] and got.tokens[2, 0].item() == 1
    warnings.clear()
    fewer = _windows_as_llama(w, same[:3], warnings)
    assert fewer.n_windows == 3 and "3 windows instead of 4" in warnings[0]


def test_parse_llama_perplexity_output():
    out = "perplexity: calculating perplexity over 4 chunks\n[1]12.3456,[2]13.0001,[3]12.9,[4]13.1234,\n" \
          "Final estimate: PPL = 13.1234 +/- 0.41234\n"
    assert parse_perplexity_output(out) == 13.1234
    assert parse_perplexity_output("[1]12.3456,[2]13.5000,\nUnexpected negative standard deviation") == 13.5
    assert parse_perplexity_output("failed to decode") is None


def write_llama_logits_file(path: Path, logprobs: np.ndarray, tokens: np.ndarray, n_ctx: int) -> None:
    """Our own writer of the format llama-perplexity's --kl-divergence-base saves (16-bit log-probs)."""
    n_chunk, scored, n_vocab = logprobs.shape
    row = 2 * ((n_vocab + 1) // 2) + 4
    with open(path, "wb") as handle:
        handle.write(b"_logits_" + struct.pack("<iii", n_ctx, n_vocab, n_chunk))
        handle.write(tokens.astype("<i4").tobytes())
        for chunk in logprobs:
            for lp in chunk.astype(np.float32):
                top = lp.max()
                low = max(lp.min(), top - 16)
                scale = (top - low) / 65535
                q = np.where(lp > low, np.rint((lp - low) / scale), 0).astype("<u2")
                out = np.zeros(row, dtype="<u2")
                out[:4] = np.array([scale, low], dtype="<f4").view("<u2")
                out[4 : 4 + n_vocab] = q
                handle.write(out.tobytes())


def test_read_llama_logprobs_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(2, 4, 11))  # 2 chunks of n_ctx 10 (4 scored each), odd vocab 11
    lp = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
    lp[0, 0, 3] = lp[0, 0].max() - 30  # far below the 16-nat band: clamped to its bottom
    tokens = np.arange(20, dtype=np.int32)
    path = tmp_path / "logits.bin"
    write_llama_logits_file(path, lp, tokens, n_ctx=10)
    got = read_llama_logprobs(path)
    assert (got.n_ctx, got.n_vocab, got.n_chunk) == (10, 11, 2)
    assert got.tokens.tolist() == list(range(20))
    window = got.window(1).numpy()
    assert window.shape == (4, 11)
    assert np.abs(window - lp[1]).max() < 16 / 65535  # within one quantization step
    bottom = lp[0, 0].max() - 16
    assert got.window(0)[0, 3].item() == pytest.approx(bottom, abs=1e-3)
    # below the band only "at or below the bottom" is known: the reference's value if it is lower too
    ref = torch.from_numpy(lp[0]).float()
    assert got.window(0, ref)[0, 3].item() == pytest.approx(lp[0, 0, 3], abs=1e-5)
    ref[0, 3] = bottom + 5.0  # the reference gives it real probability: the bottom bounds the divergence
    assert got.window(0, ref)[0, 3].item() == pytest.approx(bottom, abs=1e-3)
    assert torch.equal(got.window(1, torch.from_numpy(lp[1]).float()), got.window(1))  # nothing clamped there
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MergeqError, match="bytes, expected"):
        read_llama_logprobs(path)


# ------------------------------------------------------------------------------- whole evaluations


def tiny_tokenizer(folder: Path, *, add_bos: bool) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


def eval_text(path: Path, n_words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    # a text with structure (word i tends to follow word i-1) so a trained-ish model is not needed
    words, current = [], 0
    for _ in range(n_words):
        current = (current + rng.choice([1, 1, 1, 2, 5])) % len(WORDS)
        words.append(WORDS[current])
    path.write_text(" ".join(words) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-eval")
    ref = tiny_llama(root / "ref", dtype=torch.float16, seed=0)
    tiny_tokenizer(ref, add_bos=True)
    text = eval_text(root / "eval.txt", 200)
    return ref, text, root


def options(root: Path, **kw) -> EvalOptions:
    return EvalOptions(n_ctx=32, max_windows=4, cache_dir=root / "cache", **kw)


def perturbed_copy(ref: Path, dest: Path, scale: float) -> Path:
    from safetensors.torch import load_file, save_file

    dest.mkdir()
    for item in ref.iterdir():
        if item.name != "model.safetensors":
            dest.joinpath(item.name).write_bytes(item.read_bytes())
    state = load_file(str(ref / "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    noisy = {k: (v.float() + scale * torch.randn(v.shape, generator=gen)).to(v.dtype) if "proj" in k else v
             for k, v in state.items()}
    save_file(noisy, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_reference_against_itself(tiny):
    ref, text, root = tiny
    q = evaluate(ref, ref, text, options(root))
    assert q.kl_divergence == 0.0 and q.top1_agreement == 1.0
    assert q.perplexity == q.reference_perplexity and math.isfinite(q.perplexity) and q.perplexity > 1
    assert q.windows == 4 and q.context_length == 32 and q.eval_tokens == 4 * 15
    assert q.text_tokens == 201  # 200 words + BOS
    assert q.evaluator == "torch" and len(q.text_sha256) == 64


def test_perturbed_artifact_against_reference_and_cache(tiny, tmp_path, monkeypatch):
    ref, text, root = tiny
    small = perturbed_copy(ref, tmp_path / "small", 0.01)
    big = perturbed_copy(ref, tmp_path / "big", 0.3)
    opts = options(root)
    q_small = evaluate(small, ref, text, opts)
    q_ref = evaluate(ref, ref, text, opts)
    assert q_small.reference_perplexity == pytest.approx(q_ref.perplexity, rel=1e-12)
    # the reference is cached: evaluating another artifact must not load the reference model again
    import exporters.evaluate as ev

    loaded = []
    real = ev.load_torch_model
    monkeypatch.setattr(ev, "load_torch_model", lambda path, kind: loaded.append(Path(path)) or real(path, kind))
    q_big = evaluate(big, ref, text, opts)
    assert loaded == [big]
    assert 0 < q_small.kl_divergence < q_big.kl_divergence
    assert q_small.top1_agreement >= q_big.top1_agreement
    assert q_big.perplexity != pytest.approx(q_ref.perplexity, rel=1e-6)
    # the same definition of KL computed by hand from the two models' logits
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(big, dtype=torch.float32)
    ids = [1] + [int(t) for t in __import__("transformers").AutoTokenizer.from_pretrained(ref)(
        text.read_text()[:-1], add_special_tokens=False)["input_ids"]]
    kl_sum, n = 0.0, 0
    for i in range(4):
        window = torch.tensor([[1] + ids[i * 32 + 1 : (i + 1) * 32]])
        with torch.no_grad():
            pa = torch.log_softmax(a(window).logits[0, 16:31].double(), -1)
            pb = torch.log_softmax(b(window).logits[0, 16:31].double(), -1)
        kl_sum += float((pa.exp() * (pa - pb)).sum())
        n += 15
    assert q_big.kl_divergence == pytest.approx(kl_sum / n, rel=1e-5)


def test_into_report_fills_quality_cost_and_provenance(tiny):
    ref, text, root = tiny
    report = ArtifactReport(format="hf", quant="f16", path=str(ref), size=SizeInfo(1, 1, 16.0, None))
    evaluate_into_report(report, ref, text, options(root))
    assert report.quality is not None and report.quality.eval_tokens == 60
    assert report.stages["eval"].seconds > 0 and report.stages["eval"].peak_rss_bytes > 10 * 2**20
    prov = report.provenance["eval"]
    assert prov["text_sha256"] == report.quality.text_sha256 and prov["n_ctx"] == 32
    assert set(prov["versions"]) >= {"torch", "transformers"}
    before = report.stages["eval"].seconds
    evaluate_into_report(report, ref, text, options(root))
    assert report.stages["eval"].seconds > before  # costs add up


def test_truncated_artifact_names_the_file(tiny, tmp_path):
    ref, text, root = tiny
    broken = perturbed_copy(ref, tmp_path / "broken", 0.0)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(MergeqError, match=r"model\.safetensors.*truncated"):
        evaluate(broken, ref, text, options(root))
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(MergeqError, match=r"broken/model\.safetensors.*JSON"):
        evaluate(broken, ref, text, options(root))


def test_nan_weights_are_a_clear_error_not_a_nan_perplexity(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    ref, text, root = tiny
    bad = perturbed_copy(ref, tmp_path / "nan", 0.0)
    state = load_file(str(bad / "model.safetensors"))
    key = next(k for k in state if "q_proj" in k)
    state[key][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(MergeqError, match="non-finite"):
        evaluate(bad, ref, text, options(root))


def test_short_text_and_bad_inputs(tiny, tmp_path):
    ref, _, root = tiny
    short = eval_text(tmp_path / "short.txt", 50)  # 51 tokens < 2 windows of 32
    with pytest.raises(MergeqError, match=r"short\.txt is too short: 51 tokens"):
        evaluate(ref, ref, short, options(root))
    binary = tmp_path / "latin1.txt"
    binary.write_bytes(b"caf\xe9 " * 100)
    with pytest.raises(MergeqError, match="not UTF-8"):
        evaluate(ref, ref, binary, options(root))
    with pytest.raises(MergeqError, match="does not exist"):
        evaluate(tmp_path / "missing", ref, short, options(root))
    notgguf = tmp_path / "model.gguf"
    notgguf.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(MergeqError, match="not a GGUF file"):
        evaluate(notgguf, ref, short, options(root))


def test_tokenizer_without_bos(tmp_path):
    ref = tiny_llama(tmp_path / "ref", seed=3)
    tiny_tokenizer(ref, add_bos=False)
    text = eval_text(tmp_path / "eval.txt", 100)
    result = evaluate_full(ref, ref, text, EvalOptions(n_ctx=32, max_windows=16, cache_dir=tmp_path / "c"))
    assert result.quality.text_tokens == 100 and result.quality.windows == 3


def test_eval_command(tiny, tmp_path, capsys, monkeypatch):
    from mergeq.cli import main

    ref, text, root = tiny
    monkeypatch.setenv("MERGEQ_CACHE", str(root / "cli-cache"))
    code = main(["eval", "--model", str(ref), "--text", str(text), "--n-ctx", "32", "--windows", "3", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["kl_divergence"] == 0.0 and data[0]["eval_tokens"] == 45 and data[0]["quant"] == "f16"
    broken = perturbed_copy(ref, tmp_path / "broken", 0.0)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:500])
    code = main(["eval", "--model", str(broken), "--reference", str(ref), "--text", str(text), "--n-ctx", "32"])
    err = "".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert code == 2 and "broken/model.safetensors" in err and "truncated" in err and "Traceback" not in err


def test_reference_cache_keeps_recent_entries(tmp_path):
    import os
    import time

    from exporters.evaluate import CACHE_KEEP, EVICT_AFTER, _evict

    now = time.time()
    ages = [10, 20, 30, 2 * EVICT_AFTER, 3 * EVICT_AFTER, 60]  # seconds since last use
    for i, age in enumerate(ages):
        entry = tmp_path / f"ref-{i}"
        entry.mkdir()
        (entry / "meta.json").write_text("{}")
        os.utime(entry / "meta.json", (now - age, now - age))
    _evict(tmp_path)
    kept = sorted(p.name for p in tmp_path.glob("ref-*"))
    # the CACHE_KEEP most recent stay, and so does any entry used within EVICT_AFTER
    assert CACHE_KEEP == 3 and kept == ["ref-0", "ref-1", "ref-2", "ref-5"]
