"""Build (or reuse) a peer environment of mergeq.peers from a test, its first build logged live on the terminal."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mergeq import peers


def ensure_live(pytestconfig, name: str) -> Path:
    """peers.ensure(name) with its progress shown on stderr (not captured): a first build takes minutes."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger(peers.__name__)
    with capture.global_and_fixture_disabled():
        logger.addHandler(handler)
        old_level = logger.level
        logger.setLevel(logging.INFO)
        try:
            return peers.ensure(name)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
