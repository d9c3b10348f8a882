"""Cross-check on the demo base: its f16 GGUF evaluated by llama.cpp and its fp16 checkpoint evaluated by torch
must agree, which shows that the converter and both evaluators implement the same definition."""

from __future__ import annotations

import pytest

from exporters.eval_options import EvalOptions
from exporters.evaluate import evaluate_full

pytestmark = [pytest.mark.demo, pytest.mark.llamacpp, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from exporters.gguf import GGUFExporter, GGUFOptions
    from mergeq.demo import demo_base
    from mergeq.demo_texts import build_texts

    root = tmp_path_factory.mktemp("demo-eval")
    base = demo_base()
    text = root / "eval.txt"
    text.write_text(build_texts().eval, encoding="utf-8")  # the demo evaluation text, without the adapter build
    exporter = GGUFExporter()
    options = GGUFOptions(quants=("f16",))
    exporter.preflight(base, options)
    (report,) = exporter.export(base, root / "gguf", options)
    return base, text, report.path, root


def test_f16_gguf_and_fp16_checkpoint_agree(demo):
    base, text, gguf, root = demo
    options = EvalOptions(cache_dir=root / "cache")
    hf = evaluate_full(base, base, text, options)
    gg = evaluate_full(gguf, base, text, options)
    assert hf.quality.evaluator == "torch" and gg.quality.evaluator == "llama.cpp"
    # llama.cpp scored the reference tokenizer's windows (read from the reference file mergeq wrote)
    assert hf.quality.eval_tokens == gg.quality.eval_tokens == 16 * 255
    assert gg.quality.reference_perplexity == hf.quality.perplexity
    # the only warning allowed is the tokenizer comparison, and it must carry both counts
    assert all("tokenizes the evaluated text" in w for w in gg.warnings), gg.warnings
    ratio = gg.quality.perplexity / hf.quality.perplexity
    assert abs(ratio - 1) < 0.005, (gg.quality.perplexity, hf.quality.perplexity)
    assert 0 <= gg.quality.kl_divergence < 0.002, gg.quality.kl_divergence
    assert gg.quality.top1_agreement > 0.98, gg.quality.top1_agreement
    assert gg.provenance["llama.cpp"]["version"]
    print(
        f"\nHF fp16 ppl {hf.quality.perplexity:.4f}, GGUF f16 ppl {gg.quality.perplexity:.4f} "
        f"(ratio {ratio:.5f}), KL {gg.quality.kl_divergence:.6f}, top-1 {gg.quality.top1_agreement:.4f}; "
        f"warnings: {gg.warnings}"
    )
