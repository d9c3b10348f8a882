"""Every bad input of the hostile corpus, through the `mergeq` CLI: a clear error naming the file, tensor or key,
a nonzero exit, no traceback, nothing left behind, nothing changed (see harness.run_case)."""

from __future__ import annotations

from pathlib import Path

import make_corpus
import pytest
from harness import TRACEBACK, run_case, run_subprocess


def test_the_corpus_holds_every_listed_case(corpus):
    _, cases = corpus
    assert tuple(cases) == make_corpus.CASE_NAMES


@pytest.mark.parametrize("name", make_corpus.CASE_NAMES)
def test_case(corpus, name):
    root, cases = corpus
    outcome = run_case(cases[name], root)
    assert outcome.ok, outcome.explain()


def test_pickle_payloads_never_run(corpus):
    """The payload would create its marker file: after loading attempts through the CLI, it does not exist."""
    root, cases = corpus
    for name in ("adapter-pickle-payload", "base-pickle-payload"):
        run_case(cases[name], root)
        marker = Path(cases[name].absent[-1])
        assert marker.name == make_corpus.PAYLOAD_MARKER and not marker.exists()


@pytest.mark.parametrize("name", ["st-header-huge", "adapter-nan", "config-unknown-keys"])
def test_a_real_process_exits_nonzero_without_traceback(corpus, name):
    """The same cases in a separate `python -m mergeq.cli` process: the exit status the shell sees."""
    root, cases = corpus
    case = cases[name]
    code, output = run_subprocess(case.argv)
    assert code == 2, output
    assert TRACEBACK not in output
    assert all(Path(p).exists() is False for p in case.absent)
