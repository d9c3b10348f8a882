"""The GGUF export on tiny random Llama models built here (needs the pinned llama.cpp build: `llamacpp`).

Row lengths are chosen so the k-quant shape rules are exercised both ways: hidden 96 is a multiple of 32
but not of 256 (every k-quant tensor falls back), hidden 256 is a multiple of both (none does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf_oracle import read_with_gguf_py
from tiny_models import SP_CORPUS, sentencepiece_tokenizer

from exporters.gguf import GGUFExporter, GGUFOptions
from exporters.gguf_inspect import read_gguf, read_ggufs, size_info_for_file
from exporters.llamacpp.build import ensure_built
from exporters.llamacpp.layout import layout
from exporters.llamacpp.pin import version_info
from mergeq.core.errors import MergeqError, ToolError
from mergeq.core.hashing import sha256_file

pytestmark = pytest.mark.llamacpp

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB = 320  # 256 byte tokens (llama.cpp needs a newline token) + pieces
CORPUS = SP_CORPUS


def tiny_llama(path: Path, hidden: int, *, layers: int = 2, seed: int = 0) -> Path:
    """A random fp16 Llama with a SentencePiece tokenizer trained here and a chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(path)
    sentencepiece_tokenizer(path, vocab=VOCAB, chat_template=TEMPLATE)
    return path


@pytest.fixture(scope="module")
def built():
    return ensure_built()


@pytest.fixture(scope="module")
def model96(tmp_path_factory, built):
    return tiny_llama(tmp_path_factory.mktemp("m") / "tiny96", 96)


@pytest.fixture(scope="module")
def model256(tmp_path_factory, built):
    return tiny_llama(tmp_path_factory.mktemp("m") / "tiny256", 256)


@pytest.fixture(scope="module")
def export96(model96, tmp_path_factory):
    out = tmp_path_factory.mktemp("out96")
    exporter = GGUFExporter()
    options = GGUFOptions(quants=("Q8_0", "Q4_K_M", "F16"))
    warnings = exporter.preflight(model96, options)
    return out, exporter.export(model96, out, options), warnings


def test_layout_one_directory_per_type_and_no_leftovers(export96):
    out, reports, _ = export96
    assert [r.quant for r in reports] == ["Q8_0", "Q4_K_M", "F16"]
    for report in reports:
        assert Path(report.path) == out / report.quant / f"tiny96-{report.quant}.gguf"
        assert Path(report.path).is_file()
    assert sorted(p.name for p in out.iterdir()) == ["F16", "Q4_K_M", "Q8_0"], "work files must be gone"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.gguf")) == [
        "F16/tiny96-F16.gguf",
        "Q4_K_M/tiny96-Q4_K_M.gguf",
        "Q8_0/tiny96-Q8_0.gguf",
    ]


def test_tensor_types_and_shape_fallbacks(export96):
    _, reports, _ = export96
    by = {r.quant: r for r in reports}
    f16 = by["F16"].size
    assert f16.tensor_types == {"F16": 16, "F32": 5} and f16.fallbacks == []
    assert f16.bits_per_quantized_weight is None
    q8 = by["Q8_0"].size
    assert q8.tensor_types == {"F32": 5, "Q8_0": 16} and q8.fallbacks == []
    assert q8.bits_per_quantized_weight == pytest.approx(8.5)
    q4 = by["Q4_K_M"].size
    # 96 columns are not a multiple of 256: no k-quant tensor can exist in this file
    assert not any(t.endswith("_K") for t in q4.tensor_types)
    shape = [f for f in q4.fallbacks if f["kind"] == "shape"]
    assert len(shape) == 16 and all(f["columns"] in (96, 192) for f in shape)
    by_tensor = {f["tensor"]: f for f in shape}
    for name, f in by_tensor.items():
        assert f"{f['columns']} columns are not a multiple of 256" in f["why"]
        if name == "output.weight":  # the output rule picks Q8_0 itself when the rows do not fit 256
            assert (f["wanted"], f["got"]) == ("Q4_K", "Q8_0") and "rules put this tensor in Q8_0" in f["why"]
        else:  # announced by llama-quantize: Q4_K -> Q5_0, and Q6_K (Q4_K_M's extra bits) -> Q8_0
            assert f["got"] == {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[f["wanted"]], f
            assert "llama-quantize fell back to" in f["why"]
    assert {n for n, f in by_tensor.items() if f["wanted"] == "Q6_K"} == {
        "blk.1.attn_v.weight",
        "blk.1.ffn_down.weight",
    }
    assert any("fell back to other types" in w for w in by["Q4_K_M"].warnings)
    # the histogram counts every tensor of the file
    summary = read_gguf(Path(by["Q4_K_M"].path))
    assert sum(q4.tensor_types.values()) == len(summary.tensors) == 21


def test_size_info_without_the_log_derives_the_same_fallbacks(export96):
    """What `mergeq eval` gets for a bare GGUF: the type from general.file_type, fallbacks from the shapes."""
    _, reports, _ = export96
    for report in reports:
        info, quant, _ = size_info_for_file(read_gguf(Path(report.path)))
        assert quant == report.quant
        assert info.tensor_types == report.size.tensor_types and info.size_bytes == report.size.size_bytes
        derived = {(f["tensor"], f["got"], f["kind"]) for f in info.fallbacks}
        assert derived == {(f["tensor"], f["got"], f["kind"]) for f in report.size.fallbacks}


def test_sizes_and_bits_per_weight_are_computed_from_the_file(export96):
    _, reports, _ = export96
    for report in reports:
        path = Path(report.path)
        summary = read_gguf(path)
        size = report.size
        assert size.size_bytes == path.stat().st_size
        assert size.fp16_bytes == 2 * summary.parameters
        assert size.bits_per_weight == pytest.approx(8 * path.stat().st_size / summary.parameters)
    by = {r.quant: r.size for r in reports}
    assert by["Q4_K_M"].size_bytes < by["Q8_0"].size_bytes < by["F16"].size_bytes
    assert 5.0 < by["Q4_K_M"].bits_per_quantized_weight < 8.5  # Q5_0 (5.5) and Q8_0 (8.5) fallbacks


def test_tokenizer_and_chat_template_are_preserved(export96, model96):
    _, reports, _ = export96
    for summary in read_ggufs([Path(r.path) for r in reports]):
        assert summary.metadata["tokenizer.chat_template"] == TEMPLATE
        assert summary.metadata["tokenizer.ggml.model"] == "llama"
        assert summary.array_lengths["tokenizer.ggml.tokens"] == VOCAB
    for report in reports:
        assert report.extra["gguf"]["chat_template_matches"] is True
        assert report.extra["gguf"]["vocab_size"] == VOCAB


def test_header_reader_agrees_with_the_pinned_gguf_py_reader(export96):
    _, reports, _ = export96
    paths = [Path(r.path) for r in reports]
    for ours, theirs in zip(read_ggufs(paths), read_with_gguf_py(paths)):
        assert theirs["gguf_py"].startswith(str(layout().gguf_py))
        assert ours.metadata == theirs["metadata"]
        assert ours.array_lengths == theirs["arrays"]
        assert [(t.name, t.type, list(t.shape), t.n_elements, t.n_bytes) for t in ours.tensors] == [
            (t["name"], t["type"], t["shape"], t["n_elements"], t["n_bytes"]) for t in theirs["tensors"]
        ]


def test_truncated_or_foreign_files_are_named(export96, tmp_path):
    _, reports, _ = export96
    data = Path(reports[0].path).read_bytes()
    for name, content, message in [
        ("cut-data.gguf", data[:-100], "is truncated: its tensors need"),
        ("cut-header.gguf", data[:300], "is truncated: its header ends"),
        ("foreign.gguf", b"PK\x03\x04" + data[4:2000], "is not a GGUF file"),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(MergeqError, match=message) as caught:
            read_gguf(path)
        assert str(path) in str(caught.value)


def test_reports_carry_provenance_and_stages(export96, model96):
    _, reports, _ = export96
    for report in reports:
        data = report.to_json()
        assert data["format"] == "gguf" and data["quant"] == report.quant
        assert data["provenance"]["inputs"]["model"]["model.safetensors"] == sha256_file(model96 / "model.safetensors")
        assert data["provenance"]["tools"]["llama.cpp"] == version_info()
        assert data["provenance"]["imatrix"]["used"] is False
        assert data["provenance"]["intermediate"] == "f16"
        assert data["seconds"]["convert"] > 0 and data["peak_rss_bytes"]["convert"] > 0
        assert ("quantize" in data["seconds"]) == (report.quant != "F16")
        json.dumps(data)


def test_no_fallbacks_when_rows_fit_the_blocks(model256, tmp_path):
    (report,) = GGUFExporter().export(model256, tmp_path, GGUFOptions(quants=("Q4_K_M",)))
    size = report.size
    assert [f for f in size.fallbacks if f["kind"] == "shape"] == []
    assert size.tensor_types.get("Q4_K", 0) > 0
    # Q4_K_M's own mixture gives some tensors Q6_K: listed as mixture, not as shape fallbacks
    mixture = {f["tensor"]: f["got"] for f in size.fallbacks}
    assert mixture and set(mixture.values()) <= {"Q6_K", "Q5_K"}
    assert all(f["kind"] == "mixture" and "mixture rules" in f["why"] for f in size.fallbacks)
    assert not any("fell back" in w for w in report.warnings)


def test_same_inputs_give_byte_identical_files(model96, export96, tmp_path):
    _, reports, _ = export96
    (again,) = GGUFExporter().export(model96, tmp_path, GGUFOptions(quants=("Q4_K_M",)))
    first = next(r for r in reports if r.quant == "Q4_K_M")
    assert sha256_file(Path(again.path)) == sha256_file(Path(first.path))


def test_imatrix_is_used_and_recorded(model96, export96, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(CORPUS)
    options = GGUFOptions(quants=("Q4_K_M", "F16"), imatrix=True, calib=calib, imatrix_ctx=64)
    reports = {r.quant: r for r in GGUFExporter().export(model96, tmp_path / "out", options)}
    record = reports["Q4_K_M"].provenance["imatrix"]
    assert record == {"used": True, "calib": str(calib), "calib_sha256": sha256_file(calib), "ctx": 64}
    assert reports["F16"].provenance["imatrix"]["used"] is False
    assert "imatrix" in reports["Q4_K_M"].stages
    meta = read_gguf(Path(reports["Q4_K_M"].path)).metadata
    assert meta.get("quantize.imatrix.chunks_count", 0) > 0
    plain = next(r for r in export96[1] if r.quant == "Q4_K_M")  # the same type without an imatrix
    assert sha256_file(Path(plain.path)) != sha256_file(Path(reports["Q4_K_M"].path))
    # llama-quantize records its --imatrix argument: the name, never the temporary folder, so reruns match
    assert meta.get("quantize.imatrix.file") == "imatrix.gguf"
    again = {r.quant: r for r in GGUFExporter().export(model96, tmp_path / "again", options)}
    assert sha256_file(Path(again["Q4_K_M"].path)) == sha256_file(Path(reports["Q4_K_M"].path))


def test_llama_cpp_failure_is_a_tool_error_and_leaves_nothing_finished(model96, tmp_path):
    calib = tmp_path / "short.txt"
    calib.write_text("too short")
    out = tmp_path / "out"
    with pytest.raises(ToolError) as caught:
        GGUFExporter().export(model96, out, GGUFOptions(quants=("Q4_K_M",), imatrix=True, calib=calib))
    text = str(caught.value)
    assert text.startswith("llama-imatrix failed") and "tokens" in text and "--imatrix-ctx" in text
    assert list(out.rglob("*.gguf")) == [] and list(out.iterdir()) == []


def test_converter_failure_is_a_tool_error(model96, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in model96.iterdir():
        (broken / item.name).symlink_to(item)
    (broken / "model.safetensors").unlink()
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ToolError, match=r"^convert_hf_to_gguf.py failed"):
        GGUFExporter().export(broken, tmp_path / "out", GGUFOptions(quants=("Q8_0",)))
    assert list((tmp_path / "out").rglob("*.gguf")) == []


def test_killed_export_leaves_no_finished_looking_file(tmp_path, built):
    model = tiny_llama(tmp_path / "bigger", 512, layers=8)
    out = tmp_path / "out"
    script = (
        "import sys; from pathlib import Path; from exporters.gguf import GGUFExporter, GGUFOptions\n"
        "GGUFExporter().export(Path(sys.argv[1]), Path(sys.argv[2]), "
        "GGUFOptions(quants=('Q8_0', 'Q4_K_M', 'Q6_K')))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(model), str(out)], cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob(".gguf-work.tmp-*/*.gguf")):
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)  # the export and the llama.cpp tool it is running
    proc.wait()
    visible = [p for p in out.rglob("*.gguf") if not any(".tmp-" in part for part in p.relative_to(out).parts)]
    assert any(".tmp-" in p.name for p in out.iterdir()), "the kill should have hit unfinished work"
    # whatever is visible is a complete file (a type finished before the kill); partial ones stay hidden
    for summary in read_ggufs(visible) if visible else []:
        assert summary.size_bytes >= sum(t.n_bytes for t in summary.tensors)
    GGUFExporter().export(model, out, GGUFOptions(quants=("Q8_0",)))
    assert not [p for p in out.iterdir() if ".gguf-work.tmp-" in p.name]


def test_unknown_quant_type_from_llama_quantize_side_is_refused_before_work(model96, tmp_path):
    with pytest.raises(MergeqError):
        GGUFOptions(quants=("Q3_K_XXL",)).checked()
    assert not (tmp_path / "out").exists()


def test_llama_perplexity_batch_does_not_change_the_scores(export96, model96, tmp_path, monkeypatch):
    """Windows scored together in one batch (the default: 4 of 512 tokens) or fewer at a time (what a 128k
    vocabulary gets, to bound llama-perplexity's logits): the same numbers."""
    from exporters import eval_gguf
    from exporters.eval_options import EvalOptions
    from exporters.evaluate import evaluate_full

    assert eval_gguf.parallel_windows(512, 320) == 4 and eval_gguf.parallel_windows(512, 128256) == 2
    assert eval_gguf.parallel_windows(2048, 128256) == 1
    text = tmp_path / "eval.txt"
    text.write_text(CORPUS)
    out, _, _ = export96
    gguf = out / "Q8_0" / "tiny96-Q8_0.gguf"
    options = EvalOptions(max_windows=4)
    together = evaluate_full(gguf, model96, text, options)
    monkeypatch.setattr(eval_gguf, "parallel_windows", lambda n_ctx, n_vocab: 1)
    alone = evaluate_full(gguf, model96, text, options)
    assert together.quality.eval_tokens == alone.quality.eval_tokens > 1000
    for key in ("perplexity", "kl_divergence", "top1_agreement"):
        a, b = getattr(together.quality, key), getattr(alone.quality, key)
        assert abs(a - b) <= 1e-4 * max(abs(a), 1e-3), (key, a, b)
