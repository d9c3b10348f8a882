"""GGUF export and evaluation on a tiny random model of every family (tests/family_models.py): the pinned converter
and llama-quantize make a Q8_0 GGUF of the family's llama.cpp architecture, and `evaluate` scores it against the
checkpoint with the report's definitions (perplexity, KL, top-1 agreement): finite numbers, and a KL small enough
that llama.cpp computes the same model as transformers.

Tokenizers: the converter reads most families' vocabularies from a SentencePiece model (tiny_models'
byte-fallback tokenizer; Phi-3's llama.cpp vocabulary also looks up `<|endoftext|>`, so it gets that piece).
For OLMo 2 and Qwen3-MoE the converter only takes a byte-level BPE tokenizer whose pre-tokenizer it knows by hash:
those use the demo base's (SmolLM2's) tokenizer, so their tests also need the demo assets.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from family_models import FAMILIES, MOE_FAMILIES, family_config, family_model
from test_evaluate import eval_text
from tiny_models import sentencepiece_tokenizer

from exporters.eval_options import EvalOptions
from exporters.evaluate import evaluate_full
from exporters.gguf import GGUFExporter, GGUFOptions
from exporters.gguf_inspect import read_gguf
from mergeq.core.errors import MergeqError

pytestmark = pytest.mark.llamacpp

SP_VOCAB = 320
BPE_FAMILIES = ("olmo2", "qwen3_moe")  # the converter's path for these reads byte-level BPE only
SP_SYMBOLS = {"phi3": ("<|endoftext|>",)}
# the llama.cpp architecture each family converts to (general.architecture of the GGUF)
GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "phi3": "phi3",
    "olmo2": "olmo2",
    "mixtral": "llama",
    "qwen3_moe": "qwen3moe",
}
log = logging.getLogger(__name__)
KL_BOUND = 0.01  # nats; Q8_0 of these models measures 3e-6 .. 5e-4


def with_tokenizer(folder: Path, family: str) -> Path:
    if family in BPE_FAMILIES:
        from mergeq.demo import demo_base

        demo = demo_base()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(demo / name, folder / name)
    else:
        sentencepiece_tokenizer(folder, vocab=SP_VOCAB, symbols=SP_SYMBOLS.get(family, ()))
    return folder


FAMILY_PARAMS = [
    pytest.param(family, marks=[pytest.mark.demo] if family in BPE_FAMILIES else [], id=family)
    for family in sorted(FAMILIES)
]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return eval_text(tmp_path_factory.mktemp("text") / "eval.txt", 600)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_q8_gguf_converts_and_evaluates(tmp_path, text, family):
    vocab = 49152 if family in BPE_FAMILIES else SP_VOCAB
    model = with_tokenizer(family_model(tmp_path / family, family, vocab=vocab, dtype=torch.float16), family)
    (report,) = GGUFExporter().export(model, tmp_path / "out", GGUFOptions(quants=("Q8_0",)))
    summary = read_gguf(Path(report.path))
    arch = summary.metadata["general.architecture"]
    assert arch == GGUF_ARCH[family]
    assert summary.metadata[f"{arch}.block_count"] == family_config(family).num_hidden_layers
    if family in MOE_FAMILIES:
        assert summary.metadata[f"{arch}.expert_count"] == 4
        assert summary.metadata[f"{arch}.expert_used_count"] == 2
    assert "Q8_0" in report.size.tensor_types
    result = evaluate_full(
        Path(report.path), model, text, EvalOptions(n_ctx=64, max_windows=4, cache_dir=tmp_path / "cache")
    )
    quality = result.quality
    log.info(
        "%s: ppl %.3f (reference %.3f), KL %.6f, top-1 %.4f over %d tokens",
        family,
        quality.perplexity,
        quality.reference_perplexity,
        quality.kl_divergence,
        quality.top1_agreement,
        quality.eval_tokens,
    )
    assert quality.evaluator == "llama.cpp" and quality.windows == 4 and quality.eval_tokens > 0
    for value in (quality.perplexity, quality.reference_perplexity, quality.kl_divergence, quality.top1_agreement):
        assert math.isfinite(value)
    assert 0 <= quality.kl_divergence < KL_BOUND, (family, quality.kl_divergence)
    assert 0 < quality.top1_agreement <= 1
    assert quality.perplexity == pytest.approx(quality.reference_perplexity, rel=0.05)


def test_gemma3_layout_llama_cpp_cannot_represent_is_refused(tmp_path):
    """The pinned converter writes no layer layout for Gemma 3 and llama.cpp assumes five sliding layers then one
    global one: a checkpoint laid out otherwise (here sliding, global) would convert to another model, so the
    export refuses it before any work, naming the layer."""
    config = family_config("gemma3", vocab=SP_VOCAB, layers=2)
    config.layer_types = ["sliding_attention", "full_attention"]
    folder = tmp_path / "gemma3-2"
    config.architectures = ["Gemma3ForCausalLM"]
    config.save_pretrained(folder)
    sentencepiece_tokenizer(folder, vocab=SP_VOCAB)
    with pytest.raises(MergeqError) as err:
        GGUFExporter().preflight(folder, GGUFOptions(quants=("Q8_0",)))
    assert "layer 1 'full_attention'" in str(err.value) and "config.json" in str(err.value)
    GGUFExporter().preflight(
        with_tokenizer(family_model(tmp_path / "ok", "gemma3", vocab=SP_VOCAB), "gemma3"), GGUFOptions(quants=("Q8_0",))
    )
