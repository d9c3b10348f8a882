"""The built pinned llama.cpp: tools in place, stamped with the pinned commit, not rebuilt, and agreeing with
the pin's type tables. Builds on first use (about 5 minutes on 2 cores, then cached)."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from exporters.llamacpp.build import VARIANTS, ensure_built, is_built, tool_path
from exporters.llamacpp.convert import converter_command
from exporters.llamacpp.doctor import doctor_rows
from exporters.llamacpp.layout import read_stamp
from exporters.llamacpp.pin import load_pin
from exporters.llamacpp.run import ToolCommand, run_tool
from exporters.llamacpp.smoke import smoke_test
from mergeq.cli import main

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def where():
    return ensure_built()


def test_every_pinned_tool_is_built_and_executable(where):
    pin = load_pin()
    for name in pin.targets:
        path = tool_path(name)
        assert path == where.bin / name and path.is_file()
        assert pin.commit.encode() in path.read_bytes(), f"{name} does not carry the pinned commit"
    version = subprocess.run([str(where.bin / "llama-perplexity"), "--version"], capture_output=True, text=True)
    assert f"commit {pin.commit}" in version.stdout + version.stderr


def test_llama_quantize_knows_exactly_the_pinned_types(where):
    pin = load_pin()
    result = subprocess.run([str(where.bin / "llama-quantize"), "--help"], capture_output=True, text=True)
    listed = re.findall(r"^\s+\d+\s+or\s+(\S+)\s+:", result.stdout + result.stderr, re.MULTILINE)
    assert tuple(listed) == tuple(t for t in pin.quant_types if t != "COPY")
    assert re.search(r"^\s+COPY\s+:", result.stdout + result.stderr, re.MULTILINE)


def test_built_means_no_rebuild(where):
    stamp = where.stamp.stat().st_mtime_ns
    binary = (where.bin / "llama-quantize").stat().st_mtime_ns
    started = time.perf_counter()
    assert main(["-q", "setup-llamacpp"]) == 0
    assert time.perf_counter() - started < 5
    assert where.stamp.stat().st_mtime_ns == stamp and (where.bin / "llama-quantize").stat().st_mtime_ns == binary
    assert is_built()


def test_the_build_proved_itself_and_says_which_variant_it_is(where):
    stamp = read_stamp(where)
    pin = load_pin()
    assert stamp["variant"]["name"] in VARIANTS and stamp["variant"]["reason"]
    assert stamp["smoke"]["passed"] and [c["tool"] for c in stamp["smoke"]["checks"]] == list(pin.targets)
    if stamp["variant"]["name"] == "portable" and not stamp["variant"]["reason"].startswith("asked for"):
        assert stamp["rejected"] and stamp["rejected"][0]["variant"] == "native"
    # the smoke test runs again, on the build as it is now
    again = smoke_test(where, pin)
    assert again.passed, again.summary()


def test_doctor_reports_the_build(where):
    rows = dict(doctor_rows())
    assert rows["llama.cpp build"].startswith("built in ")
    assert rows["llama.cpp variant"].split(":")[0] in VARIANTS
    assert rows["llama.cpp smoke test"].startswith("passed: llama-quantize")
    for name in load_pin().targets:
        assert rows[f"llama.cpp tool: {name}"] == str(where.bin / name)


def test_converter_uses_the_pinned_gguf_py(where, tmp_path):
    command = converter_command(tmp_path, tmp_path / "x.gguf")
    assert command.argv[1] == str(where.converter)
    assert command.env["PYTHONPATH"].split(":")[0] == str(where.gguf_py)
    assert command.env["NO_LOCAL_GGUF"] is None
    probe = run_tool(
        ToolCommand("probe", (command.argv[0], "-c", "import gguf; print(gguf.__file__)"), env=command.env)
    )
    assert probe.stdout.strip().startswith(str(where.gguf_py))
