"""The llama.cpp pin and setup machinery, without building: fetch/verify/extract on a fake sdist, locking,
missing build tools, tool failures. Checks against the real pinned tree are marked `llamacpp`."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from exporters import llamacpp
from mergeq.errors import MergeqError, ToolError
from mergeq.hashing import sha256_file

REPO = Path(__file__).resolve().parent.parent


FOO_MODULE = """
@ModelBase.register("FooForCausalLM")
class FooModel(TextModel):
    model_arch = gguf.MODEL_ARCH.LLAMA

class VisionBase(MmprojModel):
    pass

@ModelBase.register("BarVision")
class BarVision(VisionBase):
    pass
"""


def make_fake_sdist(path: Path, version: str = "9.9.9") -> Path:
    """A small sdist laid out like llama-cpp-python's: top dir, vendor/llama.cpp with converter and gguf-py."""
    top = f"llama_cpp_python-{version}"
    files = {
        f"{top}/PKG-INFO": "Name: llama_cpp_python\n",
        f"{top}/vendor/llama.cpp/convert_hf_to_gguf.py": "print('converter')\n",
        f"{top}/vendor/llama.cpp/gguf-py/gguf/__init__.py": "VERSION = 'fake'\n",
        f"{top}/vendor/llama.cpp/conversion/__init__.py": "TEXT_MODEL_MAP: dict[str, str] = {'FooForCausalLM': 'foo', 'BarVision': 'foo'}\n",
        f"{top}/vendor/llama.cpp/conversion/foo.py": FOO_MODULE,
        f"{top}/vendor/llama.cpp/tools/quantize/quantize.cpp": "int main() {}\n",
        f"{top}/llama_cpp/__init__.py": "outside the tree\n",
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        evil = tarfile.TarInfo(f"{top}/vendor/llama.cpp/../../escape.txt")
        evil.size = 4
        archive.addfile(evil, io.BytesIO(b"evil"))
    return path


@pytest.fixture
def fake_pin(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEQ_CACHE", str(tmp_path / "cache"))
    sdist = make_fake_sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz")
    pin = replace(llamacpp.load_pin(), version="9.9.9", filename=sdist.name, sha256=sha256_file(sdist))
    return pin, sdist


def test_pin_is_complete_and_static():
    pin = llamacpp.load_pin()
    assert pin.package == "llama-cpp-python" and pin.version == "0.3.36"
    assert re.fullmatch(r"[0-9a-f]{64}", pin.sha256)
    assert re.fullmatch(r"[0-9a-f]{7,40}", pin.commit)
    assert set(pin.targets) == {"llama-quantize", "llama-perplexity", "llama-imatrix"}
    assert f"-DLLAMA_BUILD_COMMIT={pin.commit}" in pin.cmake_args
    assert {"Q8_0", "Q4_K_M", "IQ4_XS", "F16", "BF16"} <= set(pin.quant_types)
    assert pin.needs_imatrix <= set(pin.quant_types)
    assert set(pin.default_types) == set(pin.quant_types) - {"COPY"}
    info = llamacpp.version_info()
    assert info == {"package": "llama-cpp-python", "version": "0.3.36", "sha256": pin.sha256,
                    "llama_cpp_commit": pin.commit, "gguf_py_version": pin.gguf_py_version}


def test_quant_type_names_match_case_insensitively():
    assert llamacpp.canonical_quant_type("q4_k_m") == "Q4_K_M"
    assert llamacpp.canonical_quant_type(" f16 ") == "F16"
    assert llamacpp.canonical_quant_type("Q4_K_XL") is None


def test_fetch_verifies_sha256_and_extracts_only_the_tree(fake_pin):
    pin, sdist = fake_pin
    where = llamacpp.ensure_source(pin, sdist=sdist)
    assert where.root == Path(llamacpp.cache_root()) / "llama.cpp" / "9.9.9"
    assert (where.src / "convert_hf_to_gguf.py").read_text() == "print('converter')\n"
    assert (where.gguf_py / "gguf" / "__init__.py").is_file()
    assert not (where.src / "llama_cpp").exists() and not (where.src / "PKG-INFO").exists()
    assert not list(where.root.parent.rglob("escape.txt")), "a path escaping the tree was extracted"
    assert sha256_file(where.download / pin.filename) == pin.sha256
    assert llamacpp.supported_architectures(pin) == ["FooForCausalLM"]
    # extracted once: a second call does not touch it
    marker = where.src / "marker"
    marker.write_text("kept")
    llamacpp.ensure_source(pin, sdist=sdist)
    assert marker.read_text() == "kept"


def test_wrong_sha256_is_refused_and_nothing_is_extracted(fake_pin, tmp_path):
    pin, sdist = fake_pin
    bad = replace(pin, sha256="0" * 64)
    with pytest.raises(MergeqError, match="sha256 .* does not match the pin"):
        llamacpp.ensure_source(bad, sdist=sdist)
    where = llamacpp.layout(bad)
    assert not where.src.exists() and not (where.download / pin.filename).exists()


def test_sdist_without_the_tree_is_a_clear_error(fake_pin, tmp_path):
    pin, _ = fake_pin
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as archive:
        info = tarfile.TarInfo("llama_cpp_python-9.9.9/README.md")
        info.size = 0
        archive.addfile(info, io.BytesIO(b""))
    pin = replace(pin, sha256=sha256_file(empty))
    with pytest.raises(MergeqError, match="has no vendor/llama.cpp/ tree"):
        llamacpp.ensure_source(pin, sdist=empty)
    assert not llamacpp.layout(pin).src.exists()


def test_concurrent_setups_share_one_extraction(fake_pin, tmp_path):
    pin, sdist = fake_pin
    script = (
        "import sys, json; from dataclasses import replace; from exporters import llamacpp\n"
        "pin = replace(llamacpp.load_pin(), version='9.9.9', filename=sys.argv[2], sha256=sys.argv[3])\n"
        "where = llamacpp.ensure_source(pin, sdist=sys.argv[1])\n"
        "print(json.dumps(sorted(p.name for p in where.src.iterdir())))\n"
    )
    env = {**__import__("os").environ, "MERGEQ_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(sdist), pin.filename, pin.sha256], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    listings = {out for out, _ in outputs}
    assert len(listings) == 1 and "convert_hf_to_gguf.py" in json.loads(listings.pop())
    where = llamacpp.layout(pin)
    assert [p.name for p in where.root.iterdir() if ".tmp-" in p.name] == []


def test_missing_build_tools_say_what_to_install(fake_pin, tmp_path, monkeypatch):
    pin, sdist = fake_pin
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(MergeqError) as caught:
        llamacpp.ensure_built(pin, sdist=sdist)
    text = str(caught.value)
    assert "cmake" in text and "C++ compiler" in text and "apt-get install cmake g++" in text
    assert not llamacpp.layout(pin).download.exists(), "nothing may be downloaded before the tools are checked"


def test_missing_cmake_only_is_named(tmp_path, monkeypatch):
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("cc", "c++", "make"):
        real = __import__("shutil").which(name)
        if real is None:
            pytest.skip(f"{name} is not installed here")
        (tools / name).symlink_to(real)
    monkeypatch.setenv("PATH", str(tools))
    with pytest.raises(MergeqError, match=r"needs cmake, not found on PATH"):
        llamacpp.find_build_tools()


def test_setup_command_reports_missing_tools(fake_pin, tmp_path, monkeypatch):
    from mergeq.cli import main

    pin, sdist = fake_pin
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(llamacpp, "load_pin", lambda path=None: pin)
    assert main(["setup-llamacpp", "--sdist", str(sdist)]) == MergeqError.exit_code


def test_run_tool_failure_names_the_tool_and_quotes_stderr():
    command = llamacpp.ToolCommand("fake-tool", (
        sys.executable, "-c",
        "import sys\nfor i in range(40): print(f'err line {i}', file=sys.stderr)\nprint('out')\nsys.exit(3)"))
    with pytest.raises(ToolError) as caught:
        llamacpp.run_tool(command, hint="do this")
    text = str(caught.value)
    assert text.startswith("fake-tool failed with exit code 3")
    assert "err line 39" in text and "err line 25" in text and "err line 24" not in text
    assert "hint: do this" in text
    assert caught.value.exit_code == 3


def test_run_tool_missing_executable_and_signal():
    with pytest.raises(ToolError, match="cannot run /nonexistent/llama-quantize: not found"):
        llamacpp.run_tool(llamacpp.ToolCommand("llama-quantize", ("/nonexistent/llama-quantize",)))
    with pytest.raises(ToolError, match="was killed by signal 9"):
        llamacpp.run_tool(llamacpp.ToolCommand("victim", (
            sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")))


def test_run_tool_captures_output_and_env(monkeypatch):
    monkeypatch.setenv("MERGEQ_TEST_DROP", "1")
    seen = []
    result = llamacpp.run_tool(llamacpp.ToolCommand("py", (
        sys.executable, "-c",
        "import os, time; x = bytearray(64 << 20); time.sleep(0.3); "
        "print(os.environ.get('MERGEQ_TEST_SET'), os.environ.get('MERGEQ_TEST_DROP'))"),
        env={"MERGEQ_TEST_SET": "yes", "MERGEQ_TEST_DROP": None}), on_line=seen.append)
    assert result.stdout == "yes None\n" and seen == ["yes None"]
    # the child's own peak (its 64 MiB plus a bare interpreter), not the test process's inherited mark
    assert 64 << 20 <= result.peak_rss_bytes < 128 << 20, result.peak_rss_bytes


def test_doctor_rows_never_build(fake_pin, monkeypatch):
    pin, _ = fake_pin
    monkeypatch.setattr(llamacpp, "load_pin", lambda path=None: pin)
    rows = dict(llamacpp.doctor_rows())
    assert "9.9.9" in rows["llama.cpp pin"]
    assert "not fetched" in rows["llama.cpp source"] and "not built" in rows["llama.cpp build"]
    assert not llamacpp.layout(pin).root.exists()


def test_unknown_tool_name():
    with pytest.raises(MergeqError, match="not one of the pinned llama.cpp tools"):
        llamacpp.tool_path("llama-server")


# ----------------------------------------------------------------------------------------------- the real pinned tree


@pytest.mark.llamacpp
def test_supported_architectures_equal_the_converters_registered_classes():
    """The statically read list equals what the converter registers when all its model modules are imported."""
    where = llamacpp.ensure_source()
    static = llamacpp.supported_architectures()
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(static)
    script = ("import json, conversion\nfrom conversion import ModelBase, ModelType, load_all_models\n"
              "load_all_models()\nprint(json.dumps(sorted(ModelBase._model_classes[ModelType.TEXT])))")
    result = llamacpp.run_tool(llamacpp.ToolCommand(
        "conversion import", (sys.executable, "-c", script), env=llamacpp.pinned_python_env(where), cwd=where.src))
    registered = json.loads(result.stdout.strip().splitlines()[-1])
    assert static == registered
    assert llamacpp._scan_architectures(where.src / "conversion") == registered


@pytest.mark.llamacpp
def test_pinned_quant_tables_match_the_pinned_sources():
    where = llamacpp.ensure_source()
    pin = llamacpp.load_pin()
    quantize = (where.src / "tools" / "quantize" / "quantize.cpp").read_text()
    options = quantize[quantize.index("QUANT_OPTIONS"):]
    options = options[:options.index("};")]
    names = re.findall(r'\{\s*"([A-Z0-9_]+)",\s*LLAMA_FTYPE_(\w+)', options)
    assert tuple(n for n, _ in names) == pin.quant_types
    ftype_of = dict(names)
    quant = (where.src / "src" / "llama-quant.cpp").read_text()
    body = quant[quant.index("ggml_type llama_ftype_get_default_type"):]
    body = body[:body.index("default: return GGML_TYPE_COUNT")]
    default = {}
    pending = []
    for case, ret in re.findall(r"case LLAMA_FTYPE_(\w+):\s*(?:return GGML_TYPE_(\w+);)?", body):
        pending.append(case)
        if ret:
            for c in pending:
                default[c] = ret
            pending = []
    for name, ftype in ftype_of.items():
        if name == "COPY":
            continue
        assert pin.default_types[name] == default[ftype], name
    requires = quant[quant.index("static bool tensor_requires_imatrix"):]
    requires = requires[:requires.index("default:")]
    assert set(re.findall(r"case GGML_TYPE_(\w+):", requires)) == {
        "IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S", "Q2_K"}


def test_a_build_for_another_cpu_is_not_built(fake_pin):
    """The build uses -march=native: a cache restored on another CPU must be rebuilt, not run."""
    pin, _ = fake_pin
    where = llamacpp.layout(pin)
    where.bin.mkdir(parents=True)
    for name in pin.targets:
        (where.bin / name).write_text("#!/bin/sh\n")
        (where.bin / name).chmod(0o755)
    stamp = {"pin": llamacpp._stamp_content(pin), "cpu": llamacpp.cpu_fingerprint()}
    where.stamp.write_text(json.dumps(stamp))
    assert llamacpp.is_built(pin)
    where.stamp.write_text(json.dumps({**stamp, "cpu": "another-cpu"}))
    assert not llamacpp.is_built(pin)
    where.stamp.write_text(json.dumps({**stamp, "pin": {**stamp["pin"], "cmake_args": ["-DOTHER=ON"]}}))
    assert not llamacpp.is_built(pin)
    where.stamp.write_text(json.dumps(stamp))
    (where.bin / pin.targets[0]).unlink()
    assert not llamacpp.is_built(pin)
