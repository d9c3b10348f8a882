"""Cheap up-to-date checks: a file is hashed again only when its size, times or inode changed; --verify reads all."""

from __future__ import annotations

import os

import pytest

from mergeq import stages
from mergeq.core import hashing
from mergeq.core.hashing import FileStamps


@pytest.fixture
def reads(monkeypatch):
    """Count the files actually read by sha256_file (every file the hashing module opens, whoever calls it)."""
    seen: list[str] = []

    def counting(path, *args, **kwargs):
        seen.append(os.path.basename(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(hashing, "open", counting, raising=False)
    return seen


def make_tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"a" * 1000)
    (root / "sub" / "b.bin").write_bytes(b"b" * 2000)
    return root


def test_unchanged_files_are_not_read_again(tmp_path, reads):
    tree = make_tree(tmp_path / "tree")
    with stages.file_stamps(tmp_path / "out"):
        first = stages.tree_hashes(tree)
    assert sorted(reads) == ["a.bin", "b.bin"]
    assert (tmp_path / "out" / stages.STATE_DIR / stages.STAMPS_NAME).is_file()
    reads.clear()
    with stages.file_stamps(tmp_path / "out") as stamps:
        assert stages.tree_hashes(tree) == first
    assert reads == [] and stamps.trusted_files == 2 and stamps.read_files == 0
    # outside a run nothing is cached: every call reads
    stages.tree_hashes(tree)
    assert sorted(reads) == ["a.bin", "b.bin"]


def test_a_changed_file_is_read_again_even_with_its_mtime_put_back(tmp_path, reads):
    tree = make_tree(tmp_path / "tree")
    with stages.file_stamps(tmp_path / "out"):
        first = stages.tree_hashes(tree)
    target = tree / "a.bin"
    st = target.stat()
    with open(target, "r+b") as handle:  # same size, same inode
        handle.write(b"A")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back by hand; ctime moves regardless
    reads.clear()
    with stages.file_stamps(tmp_path / "out"):
        second = stages.tree_hashes(tree)
    assert reads == ["a.bin"]
    assert second["a.bin"] != first["a.bin"] and second["sub/b.bin"] == first["sub/b.bin"]


def test_a_file_replaced_by_rename_is_read_again(tmp_path, reads):
    tree = make_tree(tmp_path / "tree")
    with stages.file_stamps(tmp_path / "out"):
        stages.tree_hashes(tree)
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"b" * 2000)
    os.replace(replacement, tree / "sub" / "b.bin")  # how mergeq's own writers land a file: a new inode
    reads.clear()
    with stages.file_stamps(tmp_path / "out"):
        stages.tree_hashes(tree)
    assert reads == ["b.bin"]


def test_verify_reads_everything_and_reports_a_change_the_stamp_hid(tmp_path, reads, caplog):
    tree = make_tree(tmp_path / "tree")
    with stages.file_stamps(tmp_path / "out"):
        stages.tree_hashes(tree)
    stamps_file = tmp_path / "out" / stages.STATE_DIR / stages.STAMPS_NAME
    # forge the record: same stat stamp, other digest (what a write that kept every stat field would leave)
    known = __import__("json").loads(stamps_file.read_text())
    key = os.path.realpath(tree / "a.bin")
    known[key][1] = "0" * 64
    stamps_file.write_text(__import__("json").dumps(known))
    reads.clear()
    with stages.file_stamps(tmp_path / "out") as stamps:
        assert stages.tree_hashes(tree)["a.bin"] == "0" * 64, "without --verify the stamp is trusted"
    assert reads == [] and stamps.trusted_files == 2
    with stages.file_stamps(tmp_path / "out", verify=True) as stamps:
        hashes = stages.tree_hashes(tree)
    assert sorted(reads) == ["a.bin", "b.bin"] and stamps.read_files == 2
    assert hashes["a.bin"] == hashing.sha256_file(tree / "a.bin")
    assert "changed without a change of size, time or inode" in caplog.text


def test_verify_reads_a_file_once_however_many_stages_ask(tmp_path, reads):
    """merged/ is the merge stage's output and every export's input: --verify hashes it once per run."""
    tree = make_tree(tmp_path / "tree")
    with stages.file_stamps(tmp_path / "out", verify=True) as stamps:
        first = stages.tree_hashes(tree)
        assert stages.tree_hashes(tree) == first
    assert sorted(reads) == ["a.bin", "b.bin"] and stamps.read_files == 2
    (tree / "a.bin").write_bytes(b"c" * 1000)  # rewritten within the run: read again
    reads.clear()
    with stages.file_stamps(tmp_path / "out", verify=True):
        stages.tree_hashes(tree)
        (tree / "sub" / "b.bin").write_bytes(b"d" * 3000)
        stages.tree_hashes(tree)
    assert sorted(reads) == ["a.bin", "b.bin", "b.bin"]


def test_stamps_keep_only_the_files_of_the_last_run(tmp_path):
    one, two = make_tree(tmp_path / "one"), make_tree(tmp_path / "two")
    with stages.file_stamps(tmp_path / "out"):
        stages.tree_hashes(one)
        stages.tree_hashes(two)
    with stages.file_stamps(tmp_path / "out"):
        stages.tree_hashes(two)
    kept = FileStamps(tmp_path / "out" / stages.STATE_DIR / stages.STAMPS_NAME).known
    assert all(path.startswith(os.path.realpath(two)) for path in kept) and len(kept) == 2


def test_a_run_reads_each_file_once_whatever_asks_for_its_digest(tmp_path, reads, builders):
    """Inside a run the merge's manifest and the exporters' keys take their digests from the run's stamps: the
    base the merge stage's key hashed is not read again for the merge manifest, nor the merged checkpoint
    that the stage stamp hashed for the GGUF manifest or the evaluation's reference key."""
    from exporters.eval_reference import checkpoint_fingerprint
    from merge.merger import AdapterRef, MergeConfig, run_merge

    base = builders.llama(tmp_path / "base")
    adapter = builders.adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    inputs = sorted(p.name for folder in (base, adapter) for p in folder.iterdir() if p.is_file())
    out = tmp_path / "run"
    with stages.file_stamps(out) as stamps:
        key = {"base": stages.tree_hashes(base), "adapter": stages.tree_hashes(adapter)}  # as the merge stage's key
        assert sorted(reads) == inputs
        reads.clear()
        merged = out / "merged"
        run_merge(MergeConfig(base=base, adapters=[AdapterRef(adapter, 1.0)], out=merged, validate=False))
        assert reads == [], "the merge manifest read inputs again"
        manifest = __import__("json").loads((merged / "merge_manifest.json").read_text())
        assert manifest["inputs"]["sources"]["base"]["files"] == key["base"]
        outputs = stages.tree_hashes(merged)  # the stage stamp: the shards were hashed as the merge wrote them
        shards = sorted(name for name in outputs if name.endswith(".safetensors"))
        assert shards and sorted(reads) == sorted(set(outputs) - set(shards))
        assert all(outputs[name] == hashing.sha256_file(merged / name) for name in shards)
        reads.clear()
        hashing.tree_hashes(merged, recursive=False)  # the GGUF manifest's input hashes
        checkpoint_fingerprint(merged)
        assert reads == []
    assert stamps.read_files == len(inputs) + len(outputs) - len(shards)
    assert stamps.written_files == len(shards)
    # outside a run every digest reads its file
    hashing.tree_hashes(base, recursive=False)
    assert sorted(reads) == sorted(p.name for p in base.iterdir() if p.is_file())


def test_a_merge_keeps_its_input_digests_for_the_next_merge(tmp_path, reads, builders, monkeypatch):
    """`mergeq merge` alone keeps its inputs' digests in the cache: the same base merged again is not read again
    for the manifest, a file replaced since is, and --verify reads every one."""
    import json

    from merge.merger import AdapterRef, MergeConfig, run_merge

    monkeypatch.setenv("MERGEQ_CACHE", str(tmp_path / "cache"))
    base = builders.llama(tmp_path / "base")
    adapter = builders.adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    inputs = sorted(p.name for folder in (base, adapter) for p in folder.iterdir() if p.is_file())

    def merge(name, **kw):
        out = tmp_path / name
        run_merge(MergeConfig(base=base, adapters=[AdapterRef(adapter, 1.0)], out=out, validate=False, **kw))
        return json.loads((out / "merge_manifest.json").read_text())["inputs"]

    first = merge("one")
    assert sorted(reads) == inputs and (tmp_path / "cache" / hashing.SHARED_STAMPS).is_file()
    reads.clear()
    assert merge("two") == first and reads == []
    assert merge("three", verify=True) == first and sorted(reads) == inputs
    reads.clear()
    shard = base / "model.safetensors"
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(shard.read_bytes())
    os.replace(copy, shard)  # same bytes, a new inode
    assert merge("four") == first and reads == ["model.safetensors"]
    reads.clear()
    (tmp_path / "cache" / hashing.SHARED_STAMPS).write_text("[not a cache")  # damaged: read everything, then rewrite it
    assert merge("five") == first and sorted(reads) == inputs
    reads.clear()
    assert merge("six") == first and reads == []


def test_a_run_in_a_new_output_directory_trusts_the_inputs_another_run_or_merge_hashed(tmp_path, reads, monkeypatch):
    """Inputs (files outside the run's output) go through the cache every run and merge shares: a second output
    directory does not read the base again, --verify does, and the run's own outputs stay out of it."""
    monkeypatch.setenv("MERGEQ_CACHE", str(tmp_path / "cache"))
    tree = make_tree(tmp_path / "base")
    with stages.file_stamps(tmp_path / "one") as stamps:
        first = stages.tree_hashes(tree)
        (tmp_path / "one").mkdir()
        (tmp_path / "one" / "out.bin").write_bytes(b"an output")
        stages.tree_hashes(tmp_path / "one")
    assert sorted(reads) == ["a.bin", "b.bin", "out.bin"]
    shared = FileStamps(tmp_path / "cache" / hashing.SHARED_STAMPS).known
    assert sorted(shared) == sorted(os.path.realpath(p) for p in (tree / "a.bin", tree / "sub" / "b.bin"))
    reads.clear()
    with stages.file_stamps(tmp_path / "two") as stamps:
        assert stages.tree_hashes(tree) == first
    assert reads == [] and stamps.trusted_files == 2
    with stages.file_stamps(tmp_path / "three", verify=True):
        assert stages.tree_hashes(tree) == first
    assert sorted(reads) == ["a.bin", "b.bin"]
    reads.clear()
    (tree / "a.bin").write_bytes(b"A" * 1000)  # changed in place: read again by the next run, wherever it writes
    with stages.file_stamps(tmp_path / "four"):
        assert stages.tree_hashes(tree)["a.bin"] == hashing.sha256_file(tree / "a.bin")
    assert reads == ["a.bin", "a.bin"]  # the run's read, then this test's own


def test_the_shared_digest_cache_keeps_the_most_recently_used(tmp_path):
    files = [tmp_path / f"f{i}.bin" for i in range(4)]
    for i, path in enumerate(files):
        path.write_bytes(bytes([i]) * 100)
    cache = tmp_path / "stamps.json"
    for path in files:  # four runs, one file each, two kept
        stamps = FileStamps(cache, keep=2)
        stamps.sha256(path)
        stamps.save()
    kept = FileStamps(cache, keep=2).known
    assert sorted(kept) == sorted(os.path.realpath(p) for p in files[2:])
    stamps = FileStamps(cache, keep=2)
    assert stamps.sha256(files[2]) == hashing.sha256_file(files[2]) and stamps.trusted_files == 1


def test_a_digest_cache_that_cannot_be_written_does_not_fail_the_merge(tmp_path, builders, monkeypatch, caplog):
    from merge.merger import AdapterRef, MergeConfig, run_merge

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory would be")
    monkeypatch.setenv("MERGEQ_CACHE", str(blocked))
    base = builders.llama(tmp_path / "base")
    adapter = builders.adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "out"
    run_merge(MergeConfig(base=base, adapters=[AdapterRef(adapter, 1.0)], out=out, validate=False))
    assert (out / "merge_manifest.json").is_file()
    assert "could not save the input digests" in caplog.text


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "unplanned"])
def test_shards_are_hashed_as_they_are_written_inside_a_run(tmp_path, reads, planned):
    """Inside a run the shard writer's digests are those of the files on disk, and a run's stamps take them without
    reading the files, also after the folder around them is renamed (the atomic commit); a file rewritten or
    renamed since is read. Outside a run the writer hashes nothing."""
    import torch

    from mergeq.core.shards import OutTensor, ShardWriter

    tensors = {f"t{i}": torch.arange(i * 100, i * 100 + 300, dtype=torch.float32).reshape(3, 100) for i in range(5)}

    def write(folder, **kw):
        folder.mkdir()
        plan = [OutTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()] if planned else None
        writer = ShardWriter(folder, 2500, plan=plan, **kw)
        for name, tensor in tensors.items():
            writer.write(name, tensor) if planned else writer.add(name, tensor)
        writer.finish()
        return writer

    with stages.file_stamps(tmp_path / "out") as stamps:
        writer = write(tmp_path / "tmp-ckpt")
        assert len(writer.digests) == 3
        os.rename(tmp_path / "tmp-ckpt", tmp_path / "ckpt")
        digests = {name: hashing.file_digest(tmp_path / "ckpt" / name) for name in writer.digests}
        assert reads == [] and stamps.written_files == 3
        assert digests == writer.digests == {n: hashing.sha256_file(tmp_path / "ckpt" / n) for n in writer.digests}
        reads.clear()
        first, second = sorted(writer.digests)[:2]
        (tmp_path / "ckpt" / first).write_bytes(b"changed")
        os.rename(tmp_path / "ckpt" / second, tmp_path / "ckpt" / "moved.safetensors")
        hashing.file_digest(tmp_path / "ckpt" / first)
        hashing.file_digest(tmp_path / "ckpt" / "moved.safetensors")
        assert sorted(reads) == sorted([first, "moved.safetensors"])
    assert write(tmp_path / "plain").digests == {}
