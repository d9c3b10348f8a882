"""Evaluating int4 checkpoints as written on disk: unpacked by our own code into an fp32 model."""

from __future__ import annotations

import math

import pytest
import torch
from test_evaluate import eval_text, tiny_tokenizer
from tiny_models import tiny_llama

from exporters.eval_options import EvalOptions
from exporters.evaluate import evaluate, evaluate_full
from mergeq.core.errors import MergeqError


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    from exporters.int4.export import Int4Options, export_int4

    root = tmp_path_factory.mktemp("int4-eval")
    ref = tiny_llama(root / "ref", dtype=torch.float16, seed=5)
    tiny_tokenizer(ref, add_bos=True)
    text = eval_text(root / "eval.txt", 200)
    out = {}
    for fmt in ("native", "compressed-tensors"):
        out[fmt] = root / f"rtn-{fmt}"
        export_int4(ref, out[fmt], Int4Options(method="rtn", group_size=32, format=fmt))
    return ref, text, out, root


def test_int4_checkpoints_are_evaluated_from_their_files(int4):
    ref, text, out, root = int4
    opts = EvalOptions(n_ctx=32, max_windows=4, cache_dir=root / "cache")
    native = evaluate_full(out["native"], ref, text, opts).quality
    compressed = evaluate_full(out["compressed-tensors"], ref, text, opts).quality
    assert native.evaluator == "torch" and native.eval_tokens == 60
    # 4-bit round-to-nearest of a random model: a real but small divergence
    assert 0 < native.kl_divergence < 0.5 and math.isfinite(native.perplexity)
    assert native.top1_agreement > 0.5
    # the same RTN weights in two layouts must unpack to the same model
    assert compressed.kl_divergence == pytest.approx(native.kl_divergence, rel=1e-6, abs=1e-9)
    assert compressed.perplexity == pytest.approx(native.perplexity, rel=1e-9)


def test_int4_checkpoint_with_a_truncated_shard_names_it(int4, tmp_path):
    import shutil

    ref, text, out, root = int4
    broken = tmp_path / "broken"
    shutil.copytree(out["native"], broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(MergeqError, match=shard.name):
        evaluate(broken, ref, text, EvalOptions(n_ctx=32, max_windows=4, cache_dir=root / "cache"))
