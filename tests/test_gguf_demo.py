"""Integration: the demo base (SmolLM2-135M-Instruct, hidden size 576) becomes Q8_0 and Q4_K_M GGUFs that
the pinned llama.cpp loads and evaluates; the k-quant fallbacks of its 576-column tensors are reported."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gguf_oracle import read_with_gguf_py

from exporters.gguf import GGUFExporter, GGUFOptions
from exporters.gguf_inspect import read_gguf
from exporters.llamacpp.build import tool_command
from exporters.llamacpp.run import run_tool

pytestmark = [pytest.mark.demo, pytest.mark.llamacpp, pytest.mark.slow]

CTX = 256
CHUNKS = 4
REPORT_KEYS = {
    "format",
    "quant",
    "size_bytes",
    "bits_per_weight",
    "bits_per_quantized_weight",
    "ratio_to_fp16",
    "tensor_types",
    "fallbacks",
    "seconds",
    "warnings",
    "provenance",
}


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


def llama_perplexity(model: Path, text: Path, *extra: str) -> str:
    result = run_tool(
        tool_command(
            "llama-perplexity", "-m", model, "-f", text, "-c", str(CTX), "-b", str(CTX), "--chunks", str(CHUNKS), *extra
        )
    )
    return result.stdout + result.stderr


def stat(output: str, label: str) -> float:
    match = re.search(rf"^.*{re.escape(label)}\s*[:=]\s*(-?[0-9.]+)", output, re.MULTILINE)
    assert match, f"no {label!r} in llama-perplexity's output:\n{output[-2000:]}"
    return float(match.group(1))


def test_llama_cpp_loads_and_evaluates_each_gguf(demo):
    """llama-perplexity loads each file; the f16 run saves its logits, the others are scored against them
    in KL-divergence mode (the mode the evaluator uses). Q8_0 stays within 1% of the f16 perplexity."""
    _, reports, text, _, work = demo
    base_logits = work / "f16.kld"
    f16_ppl = stat(
        llama_perplexity(Path(reports["F16"].path), text, "--kl-divergence-base", str(base_logits)),
        "Final estimate: PPL",
    )
    assert 1.0 < f16_ppl < 200.0 and base_logits.stat().st_size > 0
    scored = {}
    for quant in ("Q8_0", "Q4_K_M"):
        output = llama_perplexity(
            Path(reports[quant].path), text, "--kl-divergence-base", str(base_logits), "--kl-divergence"
        )
        scored[quant] = {
            "ppl": stat(output, "Mean PPL(Q)"),
            "base": stat(output, "Mean PPL(base)"),
            "kld": stat(output, "Mean    KLD"),
            "top1": stat(output, "Same top p"),
        }
        assert scored[quant]["base"] == pytest.approx(f16_ppl, rel=1e-3)
    q8, q4 = scored["Q8_0"], scored["Q4_K_M"]
    assert abs(q8["ppl"] / f16_ppl - 1) < 0.01, scored
    assert 0 <= q8["kld"] < q4["kld"] and q8["kld"] < 0.02, scored
    assert q8["top1"] > q4["top1"] and q8["top1"] > 90, scored


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
    for report in reports.values():
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


def test_header_reader_agrees_with_gguf_py_on_a_real_vocabulary(demo):
    _, reports, _, _, _ = demo
    path = Path(reports["Q4_K_M"].path)
    ours, (theirs,) = read_gguf(path), read_with_gguf_py([path])
    assert ours.metadata == theirs["metadata"] and ours.array_lengths == theirs["arrays"]
    assert ours.array_lengths["tokenizer.ggml.tokens"] == 49152
    assert [(t.name, t.type, t.n_bytes) for t in ours.tensors] == [
        (t["name"], t["type"], t["n_bytes"]) for t in theirs["tensors"]
    ]
