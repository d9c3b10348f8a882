"""Faults through the CLI: a full disk, crashing llama.cpp tools, two runs on one output, kill -9 and resume."""

from __future__ import annotations

import fault_cases
import pytest

pytestmark = pytest.mark.llamacpp


def test_enospc_during_merge(corpus):
    outcome = fault_cases.enospc_merge(corpus[0])
    assert outcome.ok, outcome.explain()


def test_enospc_during_gguf_export(corpus):
    outcome = fault_cases.enospc_gguf(corpus[0])
    assert outcome.ok, outcome.explain()


def test_enospc_during_awq_export(corpus):
    outcome = fault_cases.enospc_awq(corpus[0])
    assert outcome.ok, outcome.explain()


def test_enospc_on_a_real_full_disk(corpus):
    """The injected faults above, once for real: a small tmpfs in a private mount namespace fills mid-write."""
    if not fault_cases.real_disk_available():
        pytest.skip(
            "this machine does not let a test mount a tmpfs in a user namespace (the injected ENOSPC "
            "tests above still run)"
        )
    outcome = fault_cases.enospc_real_disk(corpus[0])
    assert outcome.ok, outcome.explain()


@pytest.mark.parametrize(
    "mode, tool", [("crash", "convert_hf_to_gguf.py"), ("crash", "llama-quantize"), ("killtool", "llama-quantize")]
)
def test_llamacpp_tool_dies(corpus, mode, tool):
    outcome = fault_cases.tool_fault(corpus[0], mode, tool)
    assert outcome.ok, outcome.explain()


def test_second_run_on_the_same_output_refuses(corpus, reference):
    outcome = fault_cases.two_runs(corpus[0], reference)
    assert outcome.ok, outcome.explain()


@pytest.mark.slow
def test_kill_9_in_every_stage_then_resume_is_byte_identical(corpus, reference):
    """kill -9 at seeded units of work and commit points of every stage; never after a measured delay."""
    trials = fault_cases.kill_and_resume(corpus[0], reference)
    assert len(trials) == len(fault_cases.STAGES) * fault_cases.KILLS_PER_STAGE
    held = {t.stage for t in trials if t.how == "progress" and t.inside}
    assert held == set(fault_cases.STAGES), [t.label() + ": " + t.detail for t in trials if t.how == "progress"]
    bad = [
        f"{t.label()}: killed {t.killed}, inside {t.inside}, rerun exit {t.rerun_code}, redone {t.redone}, "
        f"identical {t.identical}, leftovers {t.leftovers}\n{t.detail}"
        for t in trials
        if not t.ok
    ]
    assert not bad, "\n".join(bad)
