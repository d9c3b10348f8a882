"""The GGUF path's plumbing with a stand-in for llama-perplexity: the reference file it is given, how its
output is read, and the checks on what it reports. (The real llama.cpp runs in test_evaluate_demo.py.)"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_evaluate import KL_LOG, eval_text, read_llama_base, tiny_tokenizer
from tiny_models import tiny_llama

import exporters.eval_gguf as eg
import exporters.evaluate as ev
from exporters.eval_options import EvalOptions
from exporters.llamacpp import build
from exporters.llamacpp.run import ToolCommand
from mergeq.core.errors import MergeqError, ToolError

FAKE = textwrap.dedent("""
    import json, os, struct, sys
    args = sys.argv[1:]
    log = os.environ["FAKE_LOG"]
    with open(log, "a") as f:
        f.write(json.dumps(args) + "\\n")
    if "-f" in args:  # the token-count probe: too short by design
        print("perplexity: tokenizing the input ..")
        print(f"perplexity: the data file you provided tokenizes to only {os.environ['FAKE_COUNT']} tokens")
        sys.exit(0)
    base = args[args.index("--kl-divergence-base") + 1]
    n_ctx, n_vocab, n_chunk = struct.unpack("<iii", open(base, "rb").read(20)[8:])
    n_chunk += int(os.environ.get("FAKE_EXTRA_CHUNKS", "0"))
    print(f"kl_divergence: computing over {n_chunk} chunks, n_ctx={n_ctx}, batch_size=2048, n_seq=4")
    print(os.environ["FAKE_STATS"])
""")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    ref = tiny_llama(tmp_path / "ref", dtype=torch.float16, vocab=96)
    tiny_tokenizer(ref, add_bos=True)
    text = eval_text(tmp_path / "eval.txt", 700)
    script = tmp_path / "fake_perplexity.py"
    script.write_text(FAKE)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(calls))
    monkeypatch.setenv("FAKE_COUNT", str(8 * 64))
    monkeypatch.setattr(
        build, "tool_command", lambda name, *args: ToolCommand(name, (sys.executable, str(script), *map(str, args)))
    )
    monkeypatch.setattr("exporters.llamacpp.pin.version_info", lambda: {"version": "test"})

    class Summary:
        array_lengths = {"tokenizer.ggml.tokens": 96}

    monkeypatch.setattr(eg, "check_gguf", lambda path: Summary())
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    options = EvalOptions(n_ctx=64, max_windows=8, cache_dir=tmp_path / "cache")
    reference_ppl = ev.evaluate(ref, ref, text, options).reference_perplexity

    def stats(ppl=7.5, ref_ppl=reference_ppl, kl=0.0123, top=91.5):
        log = KL_LOG.split("\n", 1)[1]  # without its own "computing over" line
        log = log.replace("7.674472", f"{ppl:.6f}").replace("7.185863", f"{ref_ppl:.6f}")
        return log.replace("0.055709", f"{kl:.6f}").replace("87.892", f"{top:.3f}")

    monkeypatch.setenv("FAKE_STATS", stats())
    return ref, text, gguf, options, calls, stats, monkeypatch


def test_gguf_is_scored_on_the_reference_windows(fake):
    ref, text, gguf, options, calls, _, _ = fake
    result = ev.evaluate_full(gguf, ref, text, options)
    q = result.quality
    assert (q.perplexity, q.kl_divergence, q.top1_agreement) == (7.5, 0.0123, pytest.approx(0.915))
    assert q.evaluator == "llama.cpp" and q.eval_tokens == 8 * 31 and q.windows == 8
    assert result.warnings == []  # the fake's token count equals the reference tokenizer's
    import json

    kl_call, probe_call = [json.loads(line) for line in calls.read_text().splitlines()]
    assert kl_call[:2] == ["-m", str(gguf)] and "--kl-divergence" in kl_call
    assert kl_call[kl_call.index("-c") + 1] == "64" and kl_call[kl_call.index("-b") + 1] == "2048"
    base = Path(kl_call[kl_call.index("--kl-divergence-base") + 1])
    n_ctx, n_vocab, n_chunk, tokens, q16, params, _ = read_llama_base(base)
    assert (n_ctx, n_vocab, n_chunk) == (64, 96, 8)
    assert tokens.reshape(8, 64)[:, 0].tolist() == [1] * 8  # BOS in front of every window
    assert "-f" in probe_call and probe_call[probe_call.index("-c") + 1] == str(8 * 64)
    assert result.provenance["llama.cpp"] == {"version": "test"}
    # the weights are used in place from the mapped file, whatever the memory limit: scores that do not depend on it
    assert "--no-repack" in kl_call and "--no-repack" in probe_call
    assert result.provenance["llama_weights"].startswith("mapped from the file")
    anon = result.provenance["llama_perplexity_peak_anonymous_bytes"]
    assert 0 < anon <= result.tool_peak_rss_bytes  # the stand-in's own memory (a Python process), sampled


def test_gguf_tokenizer_difference_is_a_warning(fake):
    ref, text, gguf, options, _, _, monkeypatch = fake
    monkeypatch.setenv("FAKE_COUNT", "500")
    result = ev.evaluate_full(gguf, ref, text, options)
    assert len(result.warnings) == 1 and "into 500 tokens, the reference tokenizer into 512" in result.warnings[0]


def test_gguf_llama_output_is_checked(fake):
    ref, text, gguf, options, _, stats, monkeypatch = fake
    monkeypatch.setenv("FAKE_STATS", stats(ref_ppl=99.0))
    with pytest.raises(ToolError, match="reference perplexity as 99.0000"):
        ev.evaluate_full(gguf, ref, text, options)
    monkeypatch.setenv("FAKE_STATS", stats())
    monkeypatch.setenv("FAKE_EXTRA_CHUNKS", "1")
    with pytest.raises(ToolError, match="evaluated 9 windows of 64 tokens, mergeq asked for 8 of 64"):
        ev.evaluate_full(gguf, ref, text, options)
    monkeypatch.setenv("FAKE_EXTRA_CHUNKS", "0")
    monkeypatch.setenv("FAKE_STATS", stats().replace("7.500000", "nan"))
    with pytest.raises(MergeqError, match="non-finite perplexity"):
        ev.evaluate_full(gguf, ref, text, options)
    monkeypatch.setenv("FAKE_STATS", "")
    with pytest.raises(ToolError, match="printed no perplexity"):
        ev.evaluate_full(gguf, ref, text, options)


def test_gguf_vocabulary_and_text_length_are_checked(fake):
    ref, text, gguf, options, _, _, monkeypatch = fake

    class Other:
        array_lengths = {"tokenizer.ggml.tokens": 100}

    monkeypatch.setattr(eg, "check_gguf", lambda path: Other())
    with pytest.raises(MergeqError, match="vocabulary of 100 tokens, the reference .* 96"):
        ev.evaluate_full(gguf, ref, text, options)
    with pytest.raises(MergeqError, match="at least 100 scored tokens"):
        ev.evaluate_full(gguf, ref, text, EvalOptions(n_ctx=16, max_windows=8, cache_dir=options.cache_dir))


@pytest.mark.llamacpp
def test_truncated_gguf_names_the_file(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    ref = tiny_llama(tmp_path / "ref", dtype=torch.float16)
    tiny_tokenizer(ref, add_bos=True)
    text = eval_text(tmp_path / "eval.txt", 700)
    path = tmp_path / "broken.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(96)])
    for i in range(4):
        writer.add_tensor(f"blk.{i}.weight", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 5000])
    with pytest.raises(MergeqError, match=r"broken\.gguf"):
        ev.evaluate(path, ref, text, EvalOptions(n_ctx=64, max_windows=8, cache_dir=tmp_path / "cache"))


def test_a_kl_run_that_stops_early_is_run_once_more_then_quoted(fake, caplog):
    """llama-perplexity exits 0 when its KL pass stops early ("failed to decode"): once is retried with a
    warning that quotes it; three times in a row is an error that quotes it."""
    ref, text, gguf, options, calls, stats, monkeypatch = fake
    flaky = stats().replace("Mean PPL(Q)", "kl_divergence : failed to decode\n#", 1)
    marker = Path(str(calls) + ".failed-once")
    script = f"""
import os, sys
from pathlib import Path
m = Path({str(marker)!r})
if "--kl-divergence-base" in sys.argv and not m.exists():
    m.write_text("x")
    os.environ["FAKE_STATS"] = {flaky!r}
"""
    original = Path(build.tool_command("x").argv[1])  # the fixture's fake tool
    wrapper = original.with_name("flaky.py")
    wrapper.write_text(script + original.read_text())
    monkeypatch.setattr(
        build, "tool_command", lambda name, *args: ToolCommand(name, (sys.executable, str(wrapper), *map(str, args)))
    )
    events = Path(str(calls) + ".progress")
    monkeypatch.setenv("MERGEQ_FAULT", f"progress@{events}")
    q = ev.evaluate_full(gguf, ref, text, options).quality
    assert q.perplexity == 7.5 and marker.exists()
    assert "exited 0 without statistics" in caplog.text and "failed to decode" in caplog.text
    # the run asked twice is one unit of work: one progress event, so a stage's events (the kill tests' hold
    # points) are the same whether or not a tool had to be asked again
    tools = [line.split("\t")[2].strip() for line in events.read_text().splitlines()]
    assert tools.count("tool llama-perplexity") == 2, tools  # the token-count probe and the KL run
    monkeypatch.delenv("MERGEQ_FAULT")
    monkeypatch.setenv("FAKE_STATS", flaky)
    with pytest.raises(ToolError, match=r"printed no perplexity; its last output lines:(.|\n)*failed to decode"):
        ev.evaluate_full(gguf, ref, text, options)
