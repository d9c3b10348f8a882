"""Size-budgeted GGUF mixes on a tiny random Llama (needs the pinned llama.cpp build: `llamacpp`).

Rows of 96 take only the 32-value block types (as the demo's 576 do); the down projection's rows of 256 take
the K-quants too, so the search has both kinds of tensor to decide.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_oracle import read_with_gguf_py
from tiny_models import SP_CORPUS, sentencepiece_tokenizer, tiny_llama

from exporters.gguf import GGUFExporter, GGUFOptions
from exporters.gguf_budget.slots import quant_sizes
from exporters.gguf_inspect import pinned_constants
from exporters.llamacpp.build import ensure_built
from mergeq.core.errors import MergeqError
from mergeq.core.hashing import sha256_file

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ensure_built()
    import torch

    folder = tiny_llama(
        tmp_path_factory.mktemp("m") / "tiny",
        vocab=320,
        hidden=96,
        intermediate=256,
        layers=2,
        dtype=torch.float16,
        seed=3,
    )
    return sentencepiece_tokenizer(folder)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "calib.txt"
    path.write_text(SP_CORPUS)
    return path


def options(calib: Path, *targets: str, quants=("Q4_K_M",)) -> GGUFOptions:
    return GGUFOptions(quants=quants, imatrix=True, calib=calib, imatrix_ctx=64, targets=targets)


@pytest.fixture(scope="module")
def exported(model, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    reports = GGUFExporter().export(model, out, options(calib, "like:Q4_K_M", "6bpw"))
    return out, {r.quant: r for r in reports}


def test_mix_fits_the_named_mix_size_and_its_types_are_in_the_file(exported):
    _, reports = exported
    named, mix = reports["Q4_K_M"], reports["MIX-like-Q4_K_M"]
    budget = mix.extra["budget"]
    # the search's own Q4_K_M names the imatrix without the temporary folder the exporter's does (a few bytes less)
    assert named.size.size_bytes - 256 <= budget["budget_bytes"] <= named.size.size_bytes
    assert mix.size.size_bytes == budget["predicted_bytes"] <= named.size.size_bytes
    # the pinned gguf-py's own reader sees every chosen type, so llama-quantize applied the override file
    (seen,) = read_with_gguf_py([Path(mix.path)])
    types = {t["name"]: t["type"] for t in seen["tensors"]}
    assert budget["tensor_types"] and all(types[n] == t for n, t in budget["tensor_types"].items())
    sizes = quant_sizes()
    for name, qtype in budget["tensor_types"].items():
        shape = next(t["shape"] for t in seen["tensors"] if t["name"] == name)
        assert shape[0] % sizes[qtype][0] == 0, (name, qtype)  # only types the row length allows
    assert any(sizes[t][0] == 256 for t in budget["tensor_types"].values())  # K-quants where rows allow them
    assert budget["predicted_kl"] > 0 and budget["measured"]["kl"] >= 0 and budget["named_mix"]["type"] == "Q4_K_M"
    # the file type names the type holding the most bytes of the mix
    held: dict = {}
    for t in seen["tensors"]:
        if t["name"] in budget["tensor_types"]:
            held[t["type"]] = held.get(t["type"], 0) + t["n_bytes"]
    dominant = max(held, key=held.get)
    ftype = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}.get(dominant, dominant)  # llama-quantize's aliases
    assert mix.extra["gguf"]["file_type"] == pinned_constants().LlamaFileType[f"MOSTLY_{ftype}"]
    assert set(budget["search"]["calibration"]["scales"]) >= {"attn_qk", "attn_vo", "ffn_in", "ffn_down"}


def test_the_mix_is_the_allocation_that_measured_least(exported):
    """One allocation per step of the low-type factor, each made and measured unless a step repeats a mix;
    the kept one has the least measured KL, and its numbers are the report's."""
    from exporters.gguf_budget.search import BELOW_STEPS

    _, reports = exported
    budget = reports["MIX-like-Q4_K_M"].extra["budget"]
    candidates = budget["candidates"]
    fitted = budget["search"]["calibration"]["below"]
    assert [c["below"] for c in candidates] == pytest.approx([fitted * step for step in BELOW_STEPS])
    assert all(c["bytes"] <= budget["budget_bytes"] and c["measured_kl"] >= 0 for c in candidates)
    (kept,) = [c for c in candidates if c["chosen"]]
    assert kept["measured_kl"] == min(c["measured_kl"] for c in candidates) == budget["measured"]["kl"]
    assert kept["bytes"] == budget["predicted_bytes"] and kept["predicted_kl"] == budget["predicted_kl"]
    assert all("same_as_below" not in c for c in candidates if c["chosen"])
    from exporters.llamacpp.run import EVAL_WEIGHTS

    assert budget["kl_weights"] == EVAL_WEIGHTS  # measured as the evaluation measures: mapped, never repacked


def test_a_size_target_is_respected(exported):
    _, reports = exported
    mix = next(r for q, r in reports.items() if q.startswith("MIX-") and "like" not in q)
    budget = mix.extra["budget"]
    assert mix.size.size_bytes == budget["predicted_bytes"] <= budget["budget_bytes"]


def test_report_lists_every_tensor_and_predicted_against_measured(exported):
    out, reports = exported
    md = out / "MIX-like-Q4_K_M" / "report.md"
    reports["MIX-like-Q4_K_M"].write(md.parent)
    text = md.read_text()
    assert "## Size budget" in text and "KL predicted" in text and "blk.1.ffn_down.weight" in text
    assert "Allocations the search measured" in text


def test_same_inputs_give_the_same_mix(model, calib, exported, tmp_path):
    _, first = exported
    again = {
        r.quant: r for r in GGUFExporter().export(model, tmp_path / "out", options(calib, "like:Q4_K_M", quants=()))
    }
    assert sha256_file(Path(again["MIX-like-Q4_K_M"].path)) == sha256_file(Path(first["MIX-like-Q4_K_M"].path))


def test_impossible_budget_names_the_option_and_the_smallest_size(model, calib, tmp_path):
    with pytest.raises(MergeqError) as err:
        GGUFExporter().export(model, tmp_path / "out", options(calib, "1KB", quants=()))
    message = str(err.value)
    assert "--target-size 1KB" in message and "smallest file the candidate types reach is" in message
    assert not any(p.suffix == ".gguf" for p in (tmp_path / "out").rglob("*"))
