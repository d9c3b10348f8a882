"""The hostile corpus, built once per test session from tiny models (tests/hostile/make_corpus.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    import make_corpus

    root = tmp_path_factory.mktemp("hostile")
    cases = {case.name: case for case in make_corpus.build(root)}
    return root, cases


@pytest.fixture(scope="session")
def reference(corpus):
    """One uninterrupted, traced `mergeq run` of the corpus's pipeline config."""
    import fault_cases

    root, _ = corpus
    return fault_cases.reference_run(root)
