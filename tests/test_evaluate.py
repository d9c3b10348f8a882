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
from tiny_models import tiny_llama

from exporters.eval_gguf import parse_kl_output, write_llama_base
from exporters.eval_options import EvalOptions
from exporters.eval_reference import ReferenceLogprobs
from exporters.evaluate import evaluate, evaluate_full, evaluate_into_report
from exporters.report import ArtifactReport, SizeInfo
from mergeq.core.errors import MergeqError
from mergeq.core.metrics import MetricSums, make_windows, scored_per_window, token_metrics

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


KL_LOG = """kl_divergence: computing over 16 chunks, n_ctx=512, batch_size=2048, n_seq=4
chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              \u0394p RMS            Same top p
   1       9.8570 \u00b1    0.4474       0.00251 \u00b1    0.00131       0.00029 \u00b1    0.00002     0.612 \u00b1  0.050 %    99.608 \u00b1  0.392 %
====== Perplexity statistics ======
Mean PPL(Q)                   :   7.674472 \u00b1   0.296123
Mean PPL(base)                :   7.185863 \u00b1   0.279970
====== KL divergence statistics ======
Mean    KLD:   0.055709 \u00b1   0.001496
Maximum KLD:   3.114870
====== Token probability statistics ======
RMS \u0394p    :  6.012 \u00b1 0.160 %
Same top p: 87.892 \u00b1 0.511 %
"""  # noqa: E501 (llama-perplexity's own table, as it prints it)


def test_parse_llama_kl_output():
    stats = parse_kl_output(KL_LOG)
    assert stats == {
        "chunks": 16,
        "n_ctx": 512,
        "perplexity": 7.674472,
        "reference_perplexity": 7.185863,
        "kl_divergence": 0.055709,
        "top1_percent": 87.892,
    }
    with pytest.raises(MergeqError, match="no kl divergence"):
        parse_kl_output(KL_LOG.replace("Mean    KLD", "Mean KLD?"))


def read_llama_base(path: Path):
    """Our own reader of llama-perplexity's --kl-divergence-base format, to check the writer."""
    data = path.read_bytes()
    assert data[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack("<iii", data[8:20])
    tokens = np.frombuffer(data, dtype="<i4", count=n_ctx * n_chunk, offset=20)
    row = 2 * ((n_vocab + 1) // 2) + 4
    scored = n_ctx - 1 - n_ctx // 2
    blocks = np.frombuffer(data, dtype="<u2", offset=20 + 4 * n_ctx * n_chunk).reshape(n_chunk, scored, row)
    params = np.ascontiguousarray(blocks[..., :4]).view("<f4")  # [n_chunk, scored, 2]: scale, minimum
    q = blocks[..., 4 : 4 + n_vocab]
    return n_ctx, n_vocab, n_chunk, tokens, q, params, len(data)


def test_reference_as_llama_base_file(tmp_path):
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(2, 4, 11))  # 2 windows of n_ctx 10 (4 scored each), odd vocab 11
    lp = torch.log_softmax(torch.from_numpy(logits), -1).float()
    lp[0, 0, 3] = lp[0, 0].max() - 30  # far below the 16-nat band: stored at its bottom
    lp[0, 0] = torch.log_softmax(lp[0, 0], -1)
    cache = tmp_path / "ref"
    cache.mkdir()
    for i in range(2):
        save_file({"logprobs": lp[i].contiguous()}, str(cache / f"window-{i:04d}.safetensors"))
    windows = make_windows(list(range(100, 125)), n_ctx=10, max_windows=2, bos_id=1)
    write_llama_base(tmp_path / "base.bin", ReferenceLogprobs(cache, 2), windows)
    n_ctx, n_vocab, n_chunk, tokens, q, params, size = read_llama_base(tmp_path / "base.bin")
    assert (n_ctx, n_vocab, n_chunk) == (10, 11, 2)
    assert size == 20 + 4 * 20 + 2 * 2 * 4 * (12 + 4)  # header, tokens, rows of 4 + 12 (11 rounded up) uint16
    assert tokens.tolist() == [1, *range(101, 110), 1, *range(111, 120)]
    decoded = q.astype(np.float32) * params[..., :1] + params[..., 1:2]
    inside = np.ones_like(decoded, dtype=bool)
    inside[0, 0, 3] = False
    assert np.abs(decoded - lp.numpy())[inside].max() <= 0.5 * params[..., 0].max() + 1e-6
    assert decoded[0, 0, 3] == pytest.approx(lp[0, 0].max().item() - 16, abs=1e-4) and q[0, 0, 3] == 0
    assert (q.max(axis=-1) == 65535).all()  # each row's top token at the top of the band


# ------------------------------------------------------------------------------- whole evaluations


def tiny_tokenizer(folder: Path, *, add_bos: bool) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


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
    noisy = {
        k: (v.float() + scale * torch.randn(v.shape, generator=gen)).to(v.dtype) if "proj" in k else v
        for k, v in state.items()
    }
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
    import exporters.eval_torch as et

    loaded = []
    real = et.model_logprobs
    monkeypatch.setattr(et, "model_logprobs", lambda path, *a: loaded.append(Path(path)) or real(path, *a))
    q_big = evaluate(big, ref, text, opts)
    assert loaded == [big]
    assert 0 < q_small.kl_divergence < q_big.kl_divergence
    assert q_small.top1_agreement >= q_big.top1_agreement
    assert q_big.perplexity != pytest.approx(q_ref.perplexity, rel=1e-6)
    # the same definition of KL computed by hand from the two models' logits
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(big, dtype=torch.float32)
    ids = [1] + [
        int(t)
        for t in __import__("transformers").AutoTokenizer.from_pretrained(ref)(
            text.read_text()[:-1], add_special_tokens=False
        )["input_ids"]
    ]
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

    from exporters.eval_reference import CACHE_KEEP, EVICT_AFTER, _evict

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


def test_the_reference_cache_key_names_the_device_type_it_ran_on(tiny, monkeypatch):
    """A CUDA run computes its own reference: the forward passes there sum in another order than the CPU's."""
    import mergeq.core.device as device_module
    from exporters.eval_reference import reference_key
    from mergeq.core.metrics import Windows

    ref, _, root = tiny
    windows = Windows(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long), 8, 16)
    on_cpu = reference_key(ref, windows, options(root))
    assert on_cpu["device"] == "cpu"
    assert reference_key(ref, windows, options(root, device="auto")) == on_cpu or torch.cuda.is_available()
    monkeypatch.setattr(device_module, "resolve_device", lambda name: torch.device("cuda"))
    on_gpu = reference_key(ref, windows, options(root, device="cuda"))
    assert on_gpu["device"] == "cuda" and {k: v for k, v in on_gpu.items() if k != "device"} == {
        k: v for k, v in on_cpu.items() if k != "device"
    }
