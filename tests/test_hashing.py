"""mergeq.core.hashing.tree_hashes: the one folder hasher (stages, the GGUF export's inputs, the demo assets,
the hostile harness): which files it reads, in what order, under which names."""

from __future__ import annotations

import hashlib

from mergeq.core.hashing import sha256_file, tree_hashes


def test_tree_hashes_recursive_flat_skip_and_file(tmp_path):
    (tmp_path / "b.bin").write_bytes(b"b")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.bin").write_bytes(b"c")
    (tmp_path / ".state").mkdir()
    (tmp_path / ".state" / "lock").write_text("1")
    digest = {
        name: hashlib.sha256(data).hexdigest()
        for name, data in {"a.txt": b"a", "b.bin": b"b", "sub/c.bin": b"c", ".state/lock": b"1"}.items()
    }

    everything = tree_hashes(tmp_path)
    assert list(everything) == [".state/lock", "a.txt", "b.bin", "sub/c.bin"]  # sorted, POSIX, relative
    assert everything == digest
    assert tree_hashes(tmp_path, skip=(".state",)) == {k: v for k, v in digest.items() if not k.startswith(".")}
    assert tree_hashes(tmp_path, recursive=False) == {"a.txt": digest["a.txt"], "b.bin": digest["b.bin"]}
    assert tree_hashes(tmp_path / "b.bin") == {"b.bin": sha256_file(tmp_path / "b.bin")}
    seen = []
    tree_hashes(tmp_path, recursive=False, digest=lambda p: seen.append(p.name) or "x")
    assert seen == ["a.txt", "b.bin"]
