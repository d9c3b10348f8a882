"""mergeq.core.paths: the free space where an output will go, for paths that do not exist yet (the one helper
behind the GGUF and pipeline disk checks and the disk-full error)."""

from __future__ import annotations

import shutil
from collections import namedtuple

from mergeq.core.paths import free_bytes, nearest_existing


def test_a_path_yet_to_be_written_is_measured_at_its_nearest_existing_ancestor(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert nearest_existing(tmp_path / "out" / "gguf" / "model.gguf") == tmp_path
    assert nearest_existing("relative/not/there") == tmp_path  # made absolute first
    (tmp_path / "out").mkdir()
    assert nearest_existing(tmp_path / "out" / "x") == tmp_path / "out"
    seen = []
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: seen.append(p) or usage(10, 3, 7))
    assert free_bytes(tmp_path / "out" / "a" / "b") == 7 and seen == [tmp_path / "out"]
