"""The llama.cpp pin and setup machinery, without building: fetch/verify/extract on a fake sdist, locking,
missing build tools, tool failures. Checks against the real pinned tree are marked `llamacpp`."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from exporters.llamacpp.build import (
    BuildTools,
    _stamp_content,
    cpu_fingerprint,
    ensure_built,
    find_build_tools,
    is_built,
    tool_path,
    variant_cmake_args,
)
from exporters.llamacpp.convert import _scan_architectures, supported_architectures
from exporters.llamacpp.doctor import doctor_rows
from exporters.llamacpp.layout import built_variant, layout, pinned_python_env, read_stamp
from exporters.llamacpp.pin import canonical_quant_type, load_pin, version_info
from exporters.llamacpp.run import ToolCommand, run_tool
from exporters.llamacpp.source import ensure_source
from mergeq.core.errors import MergeqError, ToolError
from mergeq.core.hashing import sha256_file
from mergeq.core.paths import cache_root

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
        f"{top}/vendor/llama.cpp/conversion/__init__.py": (
            "TEXT_MODEL_MAP: dict[str, str] = {'FooForCausalLM': 'foo', 'BarVision': 'foo'}\n"
        ),
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
    pin = replace(load_pin(), version="9.9.9", filename=sdist.name, sha256=sha256_file(sdist))
    return pin, sdist


def test_pin_is_complete_and_static():
    pin = load_pin()
    assert pin.package == "llama-cpp-python" and pin.version == "0.3.36"
    assert re.fullmatch(r"[0-9a-f]{64}", pin.sha256)
    assert re.fullmatch(r"[0-9a-f]{7,40}", pin.commit)
    assert set(pin.targets) == {"llama-quantize", "llama-perplexity", "llama-imatrix", "llama-server"}
    assert not any(arg.startswith("-DGGML_NATIVE") for arg in pin.cmake_args), "the variant sets the instruction set"
    assert f"-DLLAMA_BUILD_COMMIT={pin.commit}" in pin.cmake_args
    assert {"Q8_0", "Q4_K_M", "IQ4_XS", "F16", "BF16"} <= set(pin.quant_types)
    assert pin.needs_imatrix <= set(pin.quant_types)
    assert set(pin.default_types) == set(pin.quant_types) - {"COPY"}
    info = version_info()
    assert info == {
        "package": "llama-cpp-python",
        "version": "0.3.36",
        "sha256": pin.sha256,
        "llama_cpp_commit": pin.commit,
        "gguf_py_version": pin.gguf_py_version,
    }


def test_quant_type_names_match_case_insensitively():
    assert canonical_quant_type("q4_k_m") == "Q4_K_M"
    assert canonical_quant_type(" f16 ") == "F16"
    assert canonical_quant_type("Q4_K_XL") is None


def test_fetch_verifies_sha256_and_extracts_only_the_tree(fake_pin):
    pin, sdist = fake_pin
    where = ensure_source(pin, sdist=sdist)
    assert where.root == Path(cache_root()) / "llama.cpp" / "9.9.9"
    assert (where.src / "convert_hf_to_gguf.py").read_text() == "print('converter')\n"
    assert (where.gguf_py / "gguf" / "__init__.py").is_file()
    assert not (where.src / "llama_cpp").exists() and not (where.src / "PKG-INFO").exists()
    assert not list(where.root.parent.rglob("escape.txt")), "a path escaping the tree was extracted"
    assert sha256_file(where.download / pin.filename) == pin.sha256
    assert supported_architectures(pin) == ["FooForCausalLM"]
    # extracted once: a second call does not touch it
    marker = where.src / "marker"
    marker.write_text("kept")
    ensure_source(pin, sdist=sdist)
    assert marker.read_text() == "kept"


def test_wrong_sha256_is_refused_and_nothing_is_extracted(fake_pin, tmp_path):
    pin, sdist = fake_pin
    bad = replace(pin, sha256="0" * 64)
    with pytest.raises(MergeqError, match="sha256 .* does not match the pin"):
        ensure_source(bad, sdist=sdist)
    where = layout(bad)
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
        ensure_source(pin, sdist=empty)
    assert not layout(pin).src.exists()


def test_concurrent_setups_share_one_extraction(fake_pin, tmp_path):
    pin, sdist = fake_pin
    script = (
        "import sys, json; from dataclasses import replace\n"
        "from exporters.llamacpp.pin import load_pin; from exporters.llamacpp.source import ensure_source\n"
        "pin = replace(load_pin(), version='9.9.9', filename=sys.argv[2], sha256=sys.argv[3])\n"
        "where = ensure_source(pin, sdist=sys.argv[1])\n"
        "print(json.dumps(sorted(p.name for p in where.src.iterdir())))\n"
    )
    env = {**__import__("os").environ, "MERGEQ_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(sdist), pin.filename, pin.sha256],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    listings = {out for out, _ in outputs}
    assert len(listings) == 1 and "convert_hf_to_gguf.py" in json.loads(listings.pop())
    where = layout(pin)
    assert [p.name for p in where.root.iterdir() if ".tmp-" in p.name] == []


def test_missing_build_tools_say_what_to_install(fake_pin, tmp_path, monkeypatch):
    pin, sdist = fake_pin
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(MergeqError) as caught:
        ensure_built(pin, sdist=sdist)
    text = str(caught.value)
    assert "cmake" in text and "C++ compiler" in text and "apt-get install cmake g++" in text
    assert not layout(pin).download.exists(), "nothing may be downloaded before the tools are checked"


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
        find_build_tools()


def test_setup_command_reports_missing_tools(fake_pin, tmp_path, monkeypatch):
    from mergeq.cli import main

    pin, sdist = fake_pin
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("exporters.llamacpp.pin.load_pin", lambda path=None: pin)
    assert main(["setup-llamacpp", "--sdist", str(sdist)]) == MergeqError.exit_code


def test_run_tool_failure_names_the_tool_and_quotes_stderr():
    command = ToolCommand(
        "fake-tool",
        (
            sys.executable,
            "-c",
            "import sys\nfor i in range(40): print(f'err line {i}', file=sys.stderr)\nprint('out')\nsys.exit(3)",
        ),
    )
    with pytest.raises(ToolError) as caught:
        run_tool(command, hint="do this")
    text = str(caught.value)
    assert text.startswith("fake-tool failed with exit code 3")
    assert "err line 39" in text and "err line 25" in text and "err line 24" not in text
    assert "hint: do this" in text
    assert caught.value.exit_code == 3


def test_run_tool_missing_executable_and_signal():
    with pytest.raises(ToolError, match="cannot run /nonexistent/llama-quantize: not found"):
        run_tool(ToolCommand("llama-quantize", ("/nonexistent/llama-quantize",)))
    with pytest.raises(ToolError, match=r"was killed by signal 9 \(SIGKILL\): SIGKILL comes from outside"):
        run_tool(
            ToolCommand("victim", (sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
        )


def test_run_tool_captures_output_and_env(monkeypatch):
    monkeypatch.setenv("MERGEQ_TEST_DROP", "1")
    seen = []
    result = run_tool(
        ToolCommand(
            "py",
            (
                sys.executable,
                "-c",
                "import os, time; x = bytearray(64 << 20); time.sleep(0.3); "
                "print(os.environ.get('MERGEQ_TEST_SET'), os.environ.get('MERGEQ_TEST_DROP'))",
            ),
            env={"MERGEQ_TEST_SET": "yes", "MERGEQ_TEST_DROP": None},
        ),
        on_line=seen.append,
    )
    assert result.stdout == "yes None\n" and seen == ["yes None"]
    # the child's own peak (its 64 MiB plus a bare interpreter), not the test process's inherited mark
    assert 64 << 20 <= result.peak_rss_bytes < 128 << 20, result.peak_rss_bytes


def test_doctor_rows_never_build(fake_pin, monkeypatch):
    pin, _ = fake_pin
    monkeypatch.setattr("exporters.llamacpp.doctor.load_pin", lambda path=None: pin)
    rows = dict(doctor_rows())
    assert "9.9.9" in rows["llama.cpp pin"]
    assert "not fetched" in rows["llama.cpp source"] and "not built" in rows["llama.cpp build"]
    assert not layout(pin).root.exists()


def test_unknown_tool_name():
    with pytest.raises(MergeqError, match="not one of the pinned llama.cpp tools"):
        tool_path("llama-cli")


# ----------------------------------------------------------------------------------------------- the real pinned tree


@pytest.mark.llamacpp
def test_supported_architectures_equal_the_converters_registered_classes():
    """The statically read list equals what the converter registers when all its model modules are imported."""
    where = ensure_source()
    static = supported_architectures()
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(static)
    script = (
        "import json, conversion\nfrom conversion import ModelBase, ModelType, load_all_models\n"
        "load_all_models()\nprint(json.dumps(sorted(ModelBase._model_classes[ModelType.TEXT])))"
    )
    result = run_tool(
        ToolCommand("conversion import", (sys.executable, "-c", script), env=pinned_python_env(where), cwd=where.src)
    )
    registered = json.loads(result.stdout.strip().splitlines()[-1])
    assert static == registered
    assert _scan_architectures(where.src / "conversion") == registered


@pytest.mark.llamacpp
def test_pinned_quant_tables_match_the_pinned_sources():
    where = ensure_source()
    pin = load_pin()
    quantize = (where.src / "tools" / "quantize" / "quantize.cpp").read_text()
    options = quantize[quantize.index("QUANT_OPTIONS") :]
    options = options[: options.index("};")]
    names = re.findall(r'\{\s*"([A-Z0-9_]+)",\s*LLAMA_FTYPE_(\w+)', options)
    assert tuple(n for n, _ in names) == pin.quant_types
    ftype_of = dict(names)
    quant = (where.src / "src" / "llama-quant.cpp").read_text()
    body = quant[quant.index("ggml_type llama_ftype_get_default_type") :]
    body = body[: body.index("default: return GGML_TYPE_COUNT")]
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
    requires = quant[quant.index("static bool tensor_requires_imatrix") :]
    requires = requires[: requires.index("default:")]
    assert set(re.findall(r"case GGML_TYPE_(\w+):", requires)) == {
        "IQ3_XXS",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ2_S",
        "IQ1_M",
        "IQ1_S",
        "Q2_K",
    }


def test_a_build_for_another_cpu_is_not_built(fake_pin):
    """The build uses -march=native: a cache restored on another CPU must be rebuilt, not run."""
    pin, _ = fake_pin
    where = layout(pin)
    where.bin.mkdir(parents=True)
    for name in pin.targets:
        (where.bin / name).write_text("#!/bin/sh\n")
        (where.bin / name).chmod(0o755)
    stamp = {
        "pin": _stamp_content(pin),
        "cpu": cpu_fingerprint(),
        "variant": {"name": "native"},
        "smoke": {"passed": True},
    }
    where.stamp.write_text(json.dumps(stamp))
    assert is_built(pin)
    where.stamp.write_text(json.dumps({**stamp, "smoke": {"passed": False}}))
    assert not is_built(pin), "a build that failed (or never ran) its smoke test is not built"
    where.stamp.write_text(json.dumps({k: v for k, v in stamp.items() if k != "variant"}))
    assert not is_built(pin), "a stamp from before variants is rebuilt and tested"
    where.stamp.write_text(json.dumps({**stamp, "cpu": "another-cpu"}))
    assert not is_built(pin)
    where.stamp.write_text(json.dumps({**stamp, "pin": {**stamp["pin"], "cmake_args": ["-DOTHER=ON"]}}))
    assert not is_built(pin)
    where.stamp.write_text(json.dumps(stamp))
    (where.bin / pin.targets[0]).unlink()
    assert not is_built(pin)


# ----------------------------------------------------------------------------------------------- build variants

# A stand-in for a built tool. For the variant named in DIES (and the tools in DIES_TOOLS) it dies like the
# AMX build did, by the signal in SIGNAL (or exits with EXIT); otherwise it behaves: llama-quantize writes
# its output file, the others print something and exit 0.
STANDIN = """#!{python}
import os, signal, sys
name, variant = {name!r}, {variant!r}
if variant in {dies!r} and name in {dies_tools!r}:
    print(f"{{name}}: computing", file=sys.stderr, flush=True)
    if {signal!r}:
        os.kill(os.getpid(), {signal!r})
    sys.exit({exit!r})
if name == "llama-quantize":
    open(sys.argv[2], "wb").write(b"GGUF quantized")
print(f"{{name}} ok ({{variant}})")
"""


@pytest.fixture
def standin_build(fake_pin, monkeypatch):
    """ensure_built with the cmake build replaced by stand-in tools; returns (pin, sdist, builds, configure)."""
    pin, sdist = fake_pin
    builds: list[str] = []
    behaviour = {"dies": (), "dies_tools": ("llama-perplexity", "llama-imatrix"), "signal": 4, "exit": 1}

    def fake_build(pin_, where, tools, jobs, variant="native"):
        builds.append(variant)
        where.bin.mkdir(parents=True, exist_ok=True)
        for name in pin_.targets:
            path = where.bin / name
            path.write_text(STANDIN.format(python=sys.executable, name=name, variant=variant, **behaviour))
            path.chmod(0o755)

    monkeypatch.setattr("exporters.llamacpp.build.find_build_tools", lambda: BuildTools("cmake", "cc", "c++", "Ninja"))
    monkeypatch.setattr("exporters.llamacpp.build._build", fake_build)
    monkeypatch.setattr("exporters.llamacpp.smoke.write_tiny_gguf", lambda where, path: path.write_bytes(b"GGUF tiny"))
    monkeypatch.setattr("exporters.llamacpp.doctor.load_pin", lambda path=None: pin)
    return pin, sdist, builds, behaviour


def test_a_build_whose_tools_die_by_sigill_is_rebuilt_portable(standin_build):
    pin, sdist, builds, behaviour = standin_build
    behaviour["dies"] = ("native",)
    where = ensure_built(pin, sdist=sdist)
    assert builds == ["native", "portable"]
    stamp = read_stamp(where)
    assert stamp["variant"]["name"] == "portable"
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF"} <= set(stamp["variant"]["cmake_args"])
    reason = stamp["variant"]["reason"]
    assert "native build failed its smoke test" in reason and "llama-perplexity" in reason and "SIGILL" in reason
    assert stamp["smoke"]["passed"] and [c["tool"] for c in stamp["smoke"]["checks"]] == list(pin.targets)
    assert stamp["rejected"][0]["variant"] == "native"
    assert is_built(pin) and built_variant(where) == "portable"
    # doctor re-runs the smoke test and names the variant and why
    rows = dict(doctor_rows())
    assert rows["llama.cpp variant"].startswith("portable: the native build failed its smoke test")
    assert rows["llama.cpp smoke test"].startswith("passed: llama-quantize")
    # built means built: no third build
    ensure_built(pin, sdist=sdist)
    assert builds == ["native", "portable"]


def test_a_passing_native_build_is_kept(standin_build):
    pin, sdist, builds, _ = standin_build
    where = ensure_built(pin, sdist=sdist)
    assert builds == ["native"]
    assert read_stamp(where)["variant"] == {
        "name": "native",
        "cmake_args": ["-DGGML_NATIVE=ON"],
        "reason": "first choice",
    }
    # asking for the other variant builds it
    ensure_built(pin, sdist=sdist, variant="portable")
    assert builds == ["native", "portable"] and built_variant(where) == "portable"
    assert "asked for with --variant portable" in read_stamp(where)["variant"]["reason"]


def test_when_every_variant_dies_the_error_names_both_and_nothing_is_stamped(standin_build):
    pin, sdist, builds, behaviour = standin_build
    behaviour["dies"] = ("native", "portable")
    with pytest.raises(ToolError) as caught:
        ensure_built(pin, sdist=sdist)
    text = str(caught.value)
    assert builds == ["native", "portable"]
    assert "native: llama-perplexity was killed by signal 4 (SIGILL)" in text
    assert "portable: llama-perplexity was killed by signal 4 (SIGILL)" in text
    assert not layout(pin).stamp.exists() and not is_built(pin)
    rows = dict(doctor_rows())
    assert "not built" in rows["llama.cpp build"]


def test_a_tool_that_fails_without_a_signal_is_not_a_cpu_problem(standin_build):
    pin, sdist, builds, behaviour = standin_build
    behaviour.update(dies=("native",), signal=0, exit=1)
    with pytest.raises(ToolError, match=r"native: llama-perplexity failed with exit code 1"):
        ensure_built(pin, sdist=sdist)
    assert builds == ["native"], "an exit code is no reason to change the instruction set"


def test_portable_flags_follow_the_cpu_and_never_enable_amx():
    amx_xeon = frozenset(
        "sse4_2 avx avx2 bmi2 fma f16c avx512f avx512vl avx512dq avx512bw avx512vbmi avx512_vnni "
        "avx512_bf16 amx_tile amx_int8 amx_bf16".split()
    )
    args = variant_cmake_args("portable", amx_xeon, "x86_64")
    assert args[0] == "-DGGML_NATIVE=OFF"
    assert {
        "-DGGML_AVX2=ON",
        "-DGGML_AVX512=ON",
        "-DGGML_AVX512_VNNI=ON",
        "-DGGML_AVX512_BF16=ON",
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
        "-DGGML_AVX_VNNI=OFF",
    } <= set(args)
    # AVX-512 foundation without VL/DQ/BW: ggml would add -mavx512vl etc., so it stays off, with its extensions
    partial = variant_cmake_args("portable", frozenset({"avx", "avx2", "avx512f", "avx512_vnni"}), "x86_64")
    assert "-DGGML_AVX512=OFF" in partial and "-DGGML_AVX512_VNNI=ON" in partial
    old = variant_cmake_args("portable", frozenset({"sse4_2"}), "x86_64")
    assert "-DGGML_SSE42=ON" in old and "-DGGML_AVX=OFF" in old and "-DGGML_FMA=OFF" in old
    assert variant_cmake_args("portable", frozenset(), "aarch64") == ("-DGGML_NATIVE=OFF",)
    assert variant_cmake_args("native") == ("-DGGML_NATIVE=ON",)
    with pytest.raises(MergeqError, match="unknown llama.cpp build variant 'fast'"):
        variant_cmake_args("fast")


def test_sigill_says_the_cpu_rejected_the_build_and_how_to_rebuild():
    command = ToolCommand(
        "llama-perplexity",
        (
            sys.executable,
            "-c",
            "import os, signal, sys; print('computing', file=sys.stderr, flush=True); "
            "os.kill(os.getpid(), signal.SIGILL)",
        ),
    )
    with pytest.raises(ToolError) as caught:
        run_tool(command, hint="if model.gguf is damaged, export it again")
    text = str(caught.value)
    assert "llama-perplexity was killed by signal 4 (SIGILL): the CPU rejected an instruction" in text
    assert "the input file is not the cause" in text and "| computing" in text
    assert "mergeq setup-llamacpp --rebuild" in text and "--variant portable" in text
    assert "damaged" not in text, "a SIGILL is no evidence against the input file"
    assert caught.value.returncode == -4
    # an exit code keeps the caller's hint: the tool may have rejected its input
    with pytest.raises(ToolError, match=r"failed with exit code 2(.|\n)*hint: if model.gguf is damaged"):
        run_tool(
            ToolCommand("llama-perplexity", (sys.executable, "-c", "raise SystemExit(2)")),
            hint="if model.gguf is damaged, export it again",
        )


def test_a_tool_dies_with_a_killed_mergeq(tmp_path):
    """kill -9 of the process running a tool takes the tool down too (its own process group, parent-death
    signal): no orphan llama.cpp keeps running. The kill waits for the tool to have started."""
    marker = tmp_path / "tool.pid"
    tool = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    parent = (
        "import sys; from exporters.llamacpp.run import ToolCommand, run_tool\n"
        f"run_tool(ToolCommand('sleeper', (sys.executable, '-c', {tool!r})))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO)
    try:
        deadline = __import__("time").monotonic() + 120
        while not (marker.is_file() and marker.read_text()):
            assert proc.poll() is None and __import__("time").monotonic() < deadline, "the tool never started"
            __import__("time").sleep(0.05)
        pid = int(marker.read_text())
        assert os.getpgid(pid) == pid, "the tool runs in its own process group"
        proc.kill()
        proc.wait()
        deadline = __import__("time").monotonic() + 30
        while _alive(pid):
            assert __import__("time").monotonic() < deadline, f"tool {pid} outlived its killed parent"
            __import__("time").sleep(0.05)
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
