"""GGUF exporter options and preflight: every bad input is refused up front with a clear message."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from exporters import gguf_preflight
from exporters.gguf import GGUFExporter, GGUFOptions
from exporters.registry import get_exporter
from mergeq.core.errors import MergeqError
from mergeq.core.options import add_options, from_namespace


def parse(*argv: str) -> GGUFOptions:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_options(parser, GGUFOptions)
    return from_namespace(GGUFOptions, parser.parse_args(list(argv)))


def test_registered_as_gguf():
    target = get_exporter("gguf")
    assert target.name == "gguf" and target.options is GGUFOptions and isinstance(target(), GGUFExporter)


def test_type_names_are_canonicalised_and_deduplicated():
    options = parse("--quant", "q4_k_m", "--quant", "Q8_0,f16", "--quant", "Q4_K_M")
    assert options.quants == ("Q4_K_M", "Q8_0", "F16")
    assert parse().quants == ("Q8_0", "Q4_K_M")


def test_bad_type_name_lists_the_known_ones():
    with pytest.raises(MergeqError) as caught:
        parse("--quant", "Q4_K_XL")
    text = str(caught.value)
    assert "--quant 'Q4_K_XL' is not a llama-quantize type" in text
    assert "Q4_K_M" in text and "IQ4_XS" in text and "0c1e57098" in text
    with pytest.raises(MergeqError, match="not a llama-quantize type"):
        parse("--quant", "COPY")


def test_imatrix_options_go_together():
    with pytest.raises(MergeqError, match="--imatrix needs --calib FILE"):
        parse("--imatrix")
    with pytest.raises(MergeqError, match="--calib is only used with --imatrix"):
        parse("--calib", "x.txt")
    with pytest.raises(MergeqError, match="IQ2_XXS requires an importance matrix"):
        parse("--quant", "iq2_xxs")
    options = parse("--quant", "IQ2_XXS", "--imatrix", "--calib", "c.txt", "--imatrix-ctx", "64")
    assert options.imatrix and options.calib == Path("c.txt") and options.imatrix_ctx == 64


def test_pipeline_config_uses_the_same_validation():
    from mergeq.config import _Reader

    reader = _Reader(None, "")
    options = reader.table("gguf", GGUFOptions, {"quant": ["q8_0", "Q4_K_M"]})
    assert options.quants == ("Q8_0", "Q4_K_M") and not reader.problems
    assert reader.table("gguf", GGUFOptions, {"quant": ["Q9_9"]}) is None
    assert "[gguf] quant: --quant 'Q9_9' is not a llama-quantize type" in reader.problems[-1]


def _checkpoint(path: Path, config: dict, *, tokenizer=True, weights=True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 1024)
    return path


def test_preflight_refuses_missing_pieces(tmp_path):
    exporter = GGUFExporter()
    with pytest.raises(MergeqError, match="does not exist"):
        exporter.preflight(tmp_path / "nope", GGUFOptions())
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeqError, match=r"config.json is missing"):
        exporter.preflight(tmp_path / "empty", GGUFOptions())


@pytest.mark.llamacpp
def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    model = _checkpoint(tmp_path / "m", {"architectures": ["FancyNewForCausalLM"]})
    with pytest.raises(MergeqError) as caught:
        GGUFExporter().preflight(model, GGUFOptions())
    text = str(caught.value)
    assert "'FancyNewForCausalLM'" in text and "not supported by the pinned llama.cpp converter" in text
    assert "LlamaForCausalLM" in text and "Qwen2ForCausalLM" in text


@pytest.mark.llamacpp
def test_preflight_checks_weights_tokenizer_calib_and_disk(tmp_path, monkeypatch):
    llama = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float16"}
    with pytest.raises(MergeqError, match="holds no .safetensors or .bin weights"):
        GGUFExporter().preflight(_checkpoint(tmp_path / "a", llama, weights=False), GGUFOptions())
    with pytest.raises(MergeqError, match="has no tokenizer"):
        GGUFExporter().preflight(_checkpoint(tmp_path / "b", llama, tokenizer=False), GGUFOptions())
    model = _checkpoint(tmp_path / "c", llama)
    with pytest.raises(MergeqError, match="calibration text .* does not exist"):
        GGUFExporter().preflight(model, GGUFOptions(imatrix=True, calib=tmp_path / "missing.txt"))
    warnings = GGUFExporter().preflight(model, GGUFOptions())
    assert any("no chat template" in w for w in warnings)
    monkeypatch.setattr(gguf_preflight, "free_bytes", lambda path: 1000)
    GGUFExporter().preflight(model, GGUFOptions(quants=("Q8_0", "F32")))  # the input's disk is not the output's
    with pytest.raises(MergeqError, match="not enough free disk for the GGUF export") as caught:
        GGUFExporter().export(model, tmp_path / "out", GGUFOptions(quants=("Q8_0", "F32")))
    assert "F32" in str(caught.value) and "intermediate" in str(caught.value)
    assert not (tmp_path / "out").exists(), "refused before any work"


def test_planned_sizes_bound_the_types():
    f16 = 1000
    assert gguf_preflight.planned_bytes("F16", f16) == f16
    assert gguf_preflight.planned_bytes("F32", f16) == 2 * f16
    assert gguf_preflight.planned_bytes("Q4_K_M", f16) == gguf_preflight.planned_bytes("Q8_0", f16) < f16


@pytest.mark.llamacpp
def test_preflight_names_missing_build_tools_before_any_work(tmp_path, monkeypatch):
    """Without a llama.cpp build, a machine without cmake/compilers fails in preflight, not after the merge."""
    from exporters.llamacpp.source import ensure_source

    model = _checkpoint(tmp_path / "m", {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float16"})
    ensure_source()  # the tree is needed for the architecture check; fetched before PATH is emptied
    monkeypatch.setattr("exporters.gguf.is_built", lambda pin=None: False)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(MergeqError, match=r"(?s)needs cmake, a C compiler .* apt-get install cmake g\+\+"):
        GGUFExporter().preflight(model, GGUFOptions())
