"""The embedded demo pipeline end to end, as `mergeq run` runs it, once: every artifact, report, model card and
summary; then a rerun that skips everything and changes no byte.

kill -9 inside every stage, then resume to byte-identical artifacts, is proven on the tiny models of
tests/hostile (test_faults.py::test_kill_9_in_every_stage_then_resume_is_byte_identical): the same pipeline code,
held at units of real work instead of minutes of demo-sized work per kill."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporters.report import load_report, validate_report_json
from mergeq.stages import tree_hashes

pytestmark = [pytest.mark.demo, pytest.mark.llamacpp, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STAGE_DIRS = {"merge": "merged", "gguf": "gguf", "awq": "awq", "gptq": "gptq"}
ARTIFACTS = {("hf", "merged"), ("gguf", "gguf/Q8_0"), ("gguf", "gguf/Q4_K_M"), ("awq", "awq"), ("gptq", "gptq")}
RUN_TIMEOUT = 1800


def mergeq(*argv: str, log: Path, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with open(log, "w") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "mergeq.cli", *argv],
            cwd=REPO,
            env=env,
            stdout=stdout,
            stderr=sink,
            start_new_session=True,
        )


def run_to_end(out: Path, log: Path, *, as_json: bool = False) -> tuple[dict, str]:
    """`mergeq run --out OUT` to completion: its result (stdout's JSON with --json, which also silences the
    log; else the stages the log says ran and skipped) and its log."""
    stdout = log.with_suffix(".out")
    with open(stdout, "w") as sink:
        argv = ["run", "--out", str(out), *(["--json"] if as_json else [])]
        proc = mergeq(*argv, log=log, stdout=sink)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # a run past its time leaves nothing running behind the test
            proc.wait()
            pytest.fail(f"mergeq run took over {RUN_TIMEOUT} s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert code == 0, f"mergeq run exited {code}:\n{text[-4000:]}"
    if as_json:
        return json.loads(stdout.read_text()), text
    return {
        "ran": re.findall(r"stage (\w+): done in", text),
        "skipped": re.findall(r"stage (\w+): unchanged", text),
    }, text


def leftovers(out: Path) -> list[str]:
    return sorted(str(p) for p in out.rglob("*") if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo-pipeline")
    out = work / "out"
    started = time.monotonic()
    result, log = run_to_end(out, work / "run.log")
    seconds = {m.group(1): float(m.group(2)) for m in re.finditer(r"stage (\w+): done in ([\d.]+) s", log)}
    return out, result, seconds, time.monotonic() - started, work


def test_every_stage_runs_and_every_artifact_is_written(demo_run):
    out, result, seconds, wall, _ = demo_run
    assert result["ran"] == list(STAGE_DIRS) and result["skipped"] == []
    assert set(seconds) == set(STAGE_DIRS), seconds
    assert (out / "resolved_config.json").is_file()
    assert json.loads((out / "resolved_config.json").read_text())["exports"]["gguf"]["quant"] == ["Q8_0", "Q4_K_M"]
    merged = out / "merged"
    for name in ("config.json", "merge_manifest.json", "tokenizer.json", "tokenizer_config.json"):
        assert (merged / name).is_file(), name
    assert list(merged.glob("*.safetensors"))
    for quant in ("Q8_0", "Q4_K_M"):
        ggufs = list((out / "gguf" / quant).glob("*.gguf"))
        assert len(ggufs) == 1 and ggufs[0].read_bytes()[:4] == b"GGUF", quant
    for method in ("awq", "gptq"):
        config = json.loads((out / method / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == method
        assert config["quantization_config"]["group_size"] == 64
        assert (out / method / "tokenizer.json").is_file()
    assert json.loads((out / "awq" / "config.json").read_text())["quantization_config"]["version"] == "gemm"
    assert leftovers(out) == []


def test_every_artifact_has_a_report_measured_the_same_way(demo_run):
    out, _, _, _, _ = demo_run
    reports = {}
    for fmt, rel in ARTIFACTS:
        data = json.loads((out / rel / "report.json").read_text())
        validate_report_json(data)
        assert data["format"] == fmt and (out / rel / "report.md").is_file()
        assert ".tmp-" not in json.dumps(data), f"{rel}/report.json names a temporary directory"
        assert data["seconds"] and all(s > 0 for s in data["seconds"].values()), data["seconds"]
        assert all(rss > 0 for rss in data["peak_rss_bytes"].values())
        reports[rel] = load_report(out / rel / "report.json")
    qualities = [r.quality for r in reports.values()]
    assert all(q is not None for q in qualities)
    # one definition for every format: the same text, tokens and reference
    assert (
        len({(q.text_sha256, q.eval_tokens, q.context_length, round(q.reference_perplexity, 6)) for q in qualities})
        == 1
    ), qualities
    ratio = {rel: r.quality.perplexity_ratio for rel, r in reports.items()}
    kl = {rel: r.quality.kl_divergence for rel, r in reports.items()}
    assert ratio["merged"] == pytest.approx(1.0, abs=1e-6) and kl["merged"] == pytest.approx(0.0, abs=1e-6)
    assert 1.0 < ratio["gguf/Q8_0"] < 1.02 and kl["gguf/Q8_0"] < kl["gguf/Q4_K_M"]
    assert 1.0 < ratio["gguf/Q4_K_M"] < 1.10
    assert ratio["awq"] < 1.15 and ratio["gptq"] < 1.15, ratio  # issue 5's bar for AWQ; GPTQ sym measured 1.08
    for rel in ("gguf/Q8_0", "gguf/Q4_K_M", "awq", "gptq"):
        assert reports[rel].size.ratio_to_fp16 < 0.6, (rel, reports[rel].size.ratio_to_fp16)
    q4 = reports["gguf/Q4_K_M"]
    assert len(q4.size.fallbacks) > 100 and any("576" in f["why"] for f in q4.size.fallbacks)
    assert any("fall" in w for w in q4.warnings), q4.warnings
    for rel in ("awq", "gptq"):
        assert reports[rel].extra["vllm_kernel_by_tp"], rel  # the predicted vLLM kernel is in the report


def test_model_cards_and_summary(demo_run):
    out, _, _, _, _ = demo_run
    for _, rel in ARTIFACTS:
        card = (out / rel / "README.md").read_text()
        head = card.split("---")[1]
        assert card.startswith("---\n") and "base_model:" in head and "library_name:" in head, rel
        assert "quantization:" in head and "perplexity" in card.lower(), rel
    summary = json.loads((out / "summary.json").read_text())
    for fmt, rel in ARTIFACTS:
        found = [a for a in summary["artifacts"] if a["path"] == rel or a["path"].startswith(rel + "/")]
        assert len(found) == 1 and found[0]["format"] == fmt, (rel, found)
    assert len(summary["artifacts"]) == len(ARTIFACTS)
    markdown = (out / "summary.md").read_text()
    assert all(quant in markdown for quant in ("Q8_0", "Q4_K_M", "w4g64"))
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_every_stage_and_changes_no_byte(demo_run):
    out, _, _, _, work = demo_run
    before = tree_hashes(out)
    result, _ = run_to_end(out, work / "rerun.log", as_json=True)
    assert result["ran"] == [] and result["skipped"] == list(STAGE_DIRS), result
    assert len(result["reports"]) == len(ARTIFACTS)
    assert tree_hashes(out) == before
    # deciding that costs a stat per file: no input or output byte is read again (not a clock bound)
    result, log = run_to_end(out, work / "rerun2.log")
    assert result["ran"] == [] and tree_hashes(out) == before
    checks = re.search(r"up-to-date checks: (\d+) files .* trusted from their stamps, (\d+) read", log)
    assert checks and int(checks.group(1)) > 0 and int(checks.group(2)) == 0, log[-3000:]
