"""Integration: the demo base (SmolLM2-135M-Instruct, hidden size 576) becomes Q8_0 and Q4_K_M GGUFs that
the pinned llama.cpp loads and evaluates; the k-quant fallbacks of its 576-column tensors are reported."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exporters import llamacpp
from exporters.gguf import GGUFExporter, GGUFOptions
from exporters.gguf_inspect import read_gguf

pytestmark = [pytest.mark.demo, pytest.mark.llamacpp, pytest.mark.slow]

CTX = 256
CHUNKS = 6
REPORT_KEYS = {"format", "quant", "size_bytes", "bits_per_weight", "bits_per_quantized_weight", "ratio_to_fp16",
               "tensor_types", "fallbacks", "seconds", "warnings", "provenance"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from mergeq.demo import demo_base
    from mergeq.demo_texts import build_texts

    base = demo_base()
    work = tmp_path_factory.mktemp("demo-gguf")
    text = work / "eval.txt"
    text.write_text(build_texts().eval)
    exporter = GGUFExporter()
    options = GGUFOptions(quants=("Q8_0", "Q4_K_M", "F16"))
    warnings = exporter.preflight(base, options)
    reports = {r.quant: r for r in exporter.export(base, work / "out", options)}
    return base, reports, text, warnings, work


def perplexity(model: Path, text: Path, *extra: str) -> tuple[float, str]:
    result = llamacpp.run_tool(llamacpp.tool_command(
        "llama-perplexity", "-m", model, "-f", text, "-c", str(CTX), "-b", str(CTX), "--chunks", str(CHUNKS), *extra))
    output = result.stdout + result.stderr
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    assert match, output[-2000:]
    return float(match.group(1)), output


def test_llama_cpp_loads_and_evaluates_each_gguf(demo):
    _, reports, text, _, _ = demo
    ppl = {quant: perplexity(Path(r.path), text)[0] for quant, r in reports.items()}
    assert 1.0 < ppl["F16"] < 200.0
    assert abs(ppl["Q8_0"] / ppl["F16"] - 1) < 0.01, ppl
    assert ppl["Q4_K_M"] > ppl["Q8_0"] * 0.99, ppl


def test_kl_divergence_mode_of_llama_perplexity(demo):
    """The mode the evaluator uses: save the f16 logits once, then score an artifact against them."""
    _, reports, text, _, work = demo
    base_logits = work / "f16.kld"
    perplexity(Path(reports["F16"].path), text, "--kl-divergence-base", str(base_logits))
    assert base_logits.stat().st_size > 0
    _, output = perplexity(Path(reports["Q8_0"].path), text, "--kl-divergence-base", str(base_logits),
                           "--kl-divergence")
    kld = float(re.search(r"Mean\s+KLD:\s+(-?[0-9.]+)", output).group(1))
    assert 0 <= kld < 0.01, output[-1500:]


def test_k_quant_fallbacks_on_576_columns_are_reported(demo):
    _, reports, _, _, _ = demo
    q4 = reports["Q4_K_M"]
    shape = [f for f in q4.size.fallbacks if f["kind"] == "shape"]
    summary = read_gguf(Path(q4.path))
    matrices = [t for t in summary.tensors if t.is_matrix]
    # every matrix with 576 columns (all but ffn_down, whose rows are 1536 = 6 x 256) fell back
    assert {f["tensor"] for f in shape} == {t.name for t in matrices if t.columns == 576}
    assert all(f["columns"] == 576 and "576 columns are not a multiple of 256" in f["why"] for f in shape)
    assert q4.size.tensor_types.get("Q5_0", 0) > 0 and q4.size.tensor_types.get("Q4_K", 0) > 0
    assert any("fell back to other types" in w and "576" in w for w in q4.warnings)
    assert reports["Q8_0"].size.fallbacks == []


def test_reports_are_complete(demo):
    base, reports, _, _, _ = demo
    for quant, report in reports.items():
        data = report.to_json()
        assert REPORT_KEYS <= set(data)
        assert data["size_bytes"] == Path(report.path).stat().st_size
        assert data["ratio_to_fp16"] == pytest.approx(data["size_bytes"] / data["fp16_bytes"])
        assert data["provenance"]["tools"]["llama.cpp"]["version"] == "0.3.36"
        assert report.extra["gguf"]["chat_template_matches"] is True
        assert report.extra["gguf"]["architecture"] == "llama"
    ratio = {q: r.size.ratio_to_fp16 for q, r in reports.items()}
    assert ratio["Q4_K_M"] < ratio["Q8_0"] < 0.6 < ratio["F16"] < 1.02


def test_chat_template_equals_the_checkpoints(demo):
    base, reports, _, _, _ = demo
    template = (base / "chat_template.jinja").read_text()
    for report in reports.values():
        assert read_gguf(Path(report.path)).metadata["tokenizer.chat_template"] == template
