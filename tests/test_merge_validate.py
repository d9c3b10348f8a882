"""Built-in validation with several weighted adapters, and the cases PEFT cannot run unmerged."""

from __future__ import annotations

import pytest

from merge.merger import AdapterRef, MergeConfig, run_merge
from merge.validate import Reference, compare_candidates


def test_weighted_adapters_validate_against_peft(tmp_path, builders):
    base = builders.llama(tmp_path / "base")
    a = builders.adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=12, target_modules=["q_proj", "up_proj"])
    b = builders.adapter(
        base, tmp_path / "b", seed=2, r=8, lora_alpha=4, use_dora=True, target_modules=["v_proj", "down_proj"]
    )
    result = run_merge(
        MergeConfig(base=base, adapters=[AdapterRef(a, 0.7), AdapterRef(b, 1.0)], out=tmp_path / "o", dtype="float32")
    )
    validation = result.manifest["validation"]
    assert validation["ok"] and validation["mean_kl"] < 1e-9 and validation["max_abs_logit_delta"] < 1e-4, validation
    # the reference honours the weights: the same merge checked against weights (1, 1) is flagged
    reference = Reference(base=base, adapters=[AdapterRef(a, 1.0), AdapterRef(b, 1.0)])
    outcome = compare_candidates(reference, {"base": tmp_path / "o"}, kl_warn=1e-6, logit_warn=1e-3)
    assert outcome.results["base"]["ok"] is False and outcome.warnings


def test_weighted_dora_cannot_be_run_unmerged(tmp_path, builders):
    base = builders.llama(tmp_path / "base")
    dora = builders.adapter(base, tmp_path / "d", r=4, lora_alpha=12, use_dora=True, target_modules=["q_proj"])
    result = run_merge(MergeConfig(base=base, adapters=[AdapterRef(dora, 0.5)], out=tmp_path / "o"))
    assert "DoRA" in result.manifest["validation"]["skipped"]
    assert any(w.startswith("validation skipped") for w in result.warnings)


def test_adapters_recording_different_bases_warn(tmp_path, builders):
    import json

    base = builders.llama(tmp_path / "base")
    a = builders.adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=12, target_modules=["q_proj"])
    b = builders.adapter(base, tmp_path / "b", seed=2, r=4, lora_alpha=12, target_modules=["v_proj"])
    config = json.loads((b / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/another-model"
    (b / "adapter_config.json").write_text(json.dumps(config))
    result = run_merge(
        MergeConfig(base=base, adapters=[AdapterRef(a, 0.5), AdapterRef(b, 0.5)], out=tmp_path / "o", validate=False)
    )
    assert any("record different bases" in w and "some-org/another-model" in w for w in result.warnings)
    assert result.manifest["warnings"] == result.warnings


def _reference_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("mergeq-reference")]


def test_reference_runs_beside_the_merge_and_its_error_is_the_merges(tmp_path, builders, monkeypatch):
    """The PEFT reference's logits are computed in a thread while the merge streams; an error there is the merge's
    error, and nothing is left in or beside --out."""
    import merge.unmerged as unmerged
    import merge.validate as validate
    from mergeq.core.errors import MergeqError

    base = builders.llama(tmp_path / "base")
    adapter = builders.adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    threads = []
    real = unmerged.with_adapters

    def failing(source, prefix, layer):
        import threading

        threads.append(threading.current_thread().name)
        if prefix.endswith(".1."):
            raise MergeqError(f"PEFT refused {prefix}")
        return real(source, prefix, layer)

    monkeypatch.setattr(validate, "with_adapters", failing)
    out = tmp_path / "o"
    with pytest.raises(MergeqError, match=r"PEFT refused model\.layers\.1\."):
        run_merge(MergeConfig(base=base, adapters=[AdapterRef(adapter)], out=out, dtype="float16"))
    assert threads and all(name.startswith("mergeq-reference") for name in threads)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]
    assert not _reference_threads()


def test_a_failed_merge_stops_the_reference_at_its_next_layer(tmp_path, builders, monkeypatch):
    """When the merge fails while the reference runs, the reference stops before its next layer and is waited for:
    the merge's own error is raised and no thread runs on."""
    import sys
    import threading

    import merge.merger as merger
    import merge.unmerged as unmerged
    import merge.validate as validate
    from mergeq.core.errors import MergeqError

    base = builders.llama(tmp_path / "base")
    adapter = builders.adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    started, stops, layers = threading.Event(), [], []
    real_event, real_adapters = threading.Event, unmerged.with_adapters

    class Recorded(real_event):  # the stop signal the merge gives its reference thread
        def __init__(self):
            super().__init__()
            if sys._getframe(1).f_globals.get("__name__") == "merge.merger":
                stops.append(self)

    def first_layer_waits(source, prefix, layer):
        layers.append(prefix)
        started.set()
        assert stops and stops[-1].wait(60), "the failed merge never signalled its reference to stop"
        return real_adapters(source, prefix, layer)

    def failing_merge(source, folder, max_shard_bytes):
        assert started.wait(60), "the reference never started"
        raise MergeqError("the disk is on fire")

    monkeypatch.setattr(merger.threading, "Event", Recorded)
    monkeypatch.setattr(validate, "with_adapters", first_layer_waits)
    monkeypatch.setattr(merger, "stream_merge", failing_merge)
    with pytest.raises(MergeqError, match="the disk is on fire"):
        run_merge(MergeConfig(base=base, adapters=[AdapterRef(adapter)], out=tmp_path / "o", dtype="float16"))
    assert layers == ["model.layers.0."]  # stopped before layer 1
    assert not _reference_threads() and not (tmp_path / "o").exists()


def test_collector_paused_freezes_what_the_block_imported():
    """Imports of torch, transformers and PEFT run without the cyclic collector, whose full passes would walk their
    objects again and again; afterwards those objects are frozen out of its reach and collection goes on. In a
    child process: freezing pytest's objects would outlive the test."""
    import subprocess
    import sys

    code = (
        "import gc, json\n"
        "from mergeq.core.memory import collector_paused\n"
        "before = gc.get_freeze_count()\n"
        "with collector_paused():\n"
        "    inside = gc.isenabled()\n"
        "    import email.mime.text\n"
        "frozen = gc.get_freeze_count()\n"
        "with collector_paused():  # again: each use is a fresh block\n"
        "    import xml.dom.minidom\n"
        "print(json.dumps([inside, gc.isenabled(), before < frozen < gc.get_freeze_count()]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[false, true, true]"


def test_peft_import_compiles_nothing_and_bitsandbytes_still_works():
    """bitsandbytes wraps kernels in torch.compile at import, which imports torch's inductor compiler (0.6 s, 35-50
    MB per merge); the validation's import keeps them eager and drops bitsandbytes' warning about an optional hub
    kernel. Its 4-bit round trip still works and matches the compiled build's (the same arithmetic). In child
    processes: the imports are per process."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    roundtrip = (
        "import torch, hashlib\n"
        "import bitsandbytes.functional as F\n"
        "torch.manual_seed(0)\n"
        "w = torch.randn(64, 128)\n"
        "q, state = F.quantize_4bit(w.to(torch.bfloat16), quant_type='nf4')\n"
        "d = F.dequantize_4bit(q, state).float()\n"
        "print(hashlib.sha256(d.numpy().tobytes()).hexdigest(), float((d - w).abs().mean()))\n"
    )
    ours = (
        "import sys\n"
        "from mergeq.core.imports import peft_imported\n"
        "peft_imported()\n"
        "assert 'peft' in sys.modules and 'bitsandbytes' in sys.modules\n"
        "print('compile_fx' if 'torch._inductor.compile_fx' in sys.modules else 'eager')\n" + roundtrip
    )
    mine = subprocess.run([sys.executable, "-c", ours], capture_output=True, text=True, check=True)
    plain = subprocess.run(
        [sys.executable, "-c", "import peft\n" + roundtrip], capture_output=True, text=True, check=True
    )
    assert mine.stdout.splitlines()[0] == "eager"
    assert "kernels-community" not in mine.stderr, mine.stderr
    digest, error = mine.stdout.splitlines()[1].split()
    assert float(error) < 0.1  # nf4 of unit normals: mean |error| about 0.07
    assert digest == plain.stdout.split()[0]  # bitsandbytes' own (compiled) kernels give the same bits
