"""Shared fixtures: tiny random models and adapters built in the test, in seconds."""

from __future__ import annotations

import pytest
from tiny_models import make_adapter, tiny_gpt2, tiny_llama


@pytest.fixture
def builders():
    class Builders:
        llama = staticmethod(tiny_llama)
        gpt2 = staticmethod(tiny_gpt2)
        adapter = staticmethod(make_adapter)

    return Builders
