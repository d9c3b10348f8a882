"""Checkpoint reading: header validation before any data is read, sharded indexes, `.bin` via weights_only."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from mergeq.core.checkpoint import Checkpoint
from mergeq.core.errors import MergeqError
from mergeq.core.safetensors_file import SafetensorsFile, read_safetensors_header
from mergeq.core.shards import OutTensor, ShardWriter


def raw_file(path, header: dict, data: bytes = b"", length: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


GOOD = {
    "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]},
}


def test_valid_file_reads_lazily(tmp_path):
    t = {"a": torch.arange(4, dtype=torch.float32).reshape(2, 2), "b": torch.ones(4, dtype=torch.float16)}
    save_file(t, tmp_path / "m.safetensors")
    st = SafetensorsFile(tmp_path / "m.safetensors")
    assert torch.equal(st.get("a"), t["a"])
    assert st.get("b", torch.float32).dtype == torch.float32
    copy = st.get("a")
    copy += 1  # a fresh tensor, never a view into the read-only map
    assert torch.equal(st.get("a"), t["a"])
    st.close()


def _mapped_kib(path) -> int:
    """KiB of `path` mapped into this process now (Rss of its mappings in /proc/self/smaps)."""
    total, current = 0, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                current = parts[5] if len(parts) > 5 else None
            elif parts[0] == "Rss:" and current == str(path):
                total += int(parts[1])
    return total


def test_view_reads_the_file_in_place_and_outlives_close(tmp_path):
    t = {"w": torch.randn(256, 512).to(torch.float16), "b": torch.ones(3)}
    save_file(t, tmp_path / "m.safetensors")
    st = SafetensorsFile(tmp_path / "m.safetensors")
    view, release = st.view("w")
    assert torch.equal(view, t["w"]) and view.data_ptr() == st.view("w")[0].data_ptr()  # the map, not a copy
    release()
    release(1024, 4096)
    assert torch.equal(view, t["w"])  # released pages fault back in from the page cache
    st.close()  # the views keep the map: closing must not unmap memory they read
    assert torch.equal(view, t["w"]) and torch.equal(st.get("b"), t["b"])
    st.close()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_reading_a_file_tensor_by_tensor_leaves_no_pages_mapped(tmp_path):
    """The kernel maps whole page-cache folios (up to 2 MiB) around a fault, so a tensor's read maps pages of its
    neighbours; they are released with it and do not pile up over the file (54 MiB over a 1 GB shard before)."""
    path = tmp_path / "m.safetensors"
    save_file({f"t{i:03d}": torch.full((300_000,), float(i)) for i in range(48)}, path)  # 48 x 1.2 MB
    st = SafetensorsFile(path)
    for name in st.keys():
        for part in st.chunks(name, 256 * 1024):
            assert float(part[0]) == float(int(name[1:]))
    assert _mapped_kib(path) <= 4096
    for name in st.keys():
        st.get(name)
    assert _mapped_kib(path) <= 4096
    st.close()


@pytest.mark.parametrize(
    "case, header, data, length, message",
    [
        ("tiny", None, b"", None, "fewer than the 8-byte header"),
        ("header past end", GOOD, b"\0" * 24, 10_000, "runs past the end"),
        ("huge header", GOOD, b"\0" * 24, 200 * 1024 * 1024, "exceeds the 100 MB limit"),
        ("truncated data", GOOD, b"\0" * 20, None, "truncated"),
        (
            "overlap",
            {
                "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
            },
            b"\0" * 24,
            None,
            "overlap",
        ),
        (
            "size mismatch",
            {"a": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}},
            b"\0" * 16,
            None,
            "needs 24 bytes",
        ),
        ("backwards", {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 16, None, "go backwards"),
        ("bad dtype", {"a": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}}, b"\0" * 2, None, "unknown dtype"),
    ],
)
def test_corrupt_headers_are_refused(tmp_path, case, header, data, length, message):
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(b"\1\2\3")
    else:
        raw_file(path, header, data, length)
    with pytest.raises(MergeqError) as err:
        read_safetensors_header(path)
    assert message in str(err.value) and "bad.safetensors" in str(err.value)


def test_non_json_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 6) + b"{nope}" + b"\0" * 8)
    with pytest.raises(MergeqError, match="not valid JSON"):
        read_safetensors_header(path)


def _sharded(tmp_path, weight_map):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"x": torch.zeros(2)}, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_index_naming_a_missing_shard(tmp_path):
    folder = _sharded(tmp_path, {"x": "model-00001-of-00001.safetensors", "y": "model-00002-of-00002.safetensors"})
    with pytest.raises(MergeqError, match="model-00002-of-00002.safetensors.*does not exist"):
        Checkpoint(folder)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_path_escaping_the_folder(tmp_path, shard):
    folder = _sharded(tmp_path, {"x": shard})
    with pytest.raises(MergeqError, match="escapes the checkpoint folder"):
        Checkpoint(folder)


def test_sharded_checkpoint_round_trip(tmp_path):
    tensors = {f"t{i}": torch.randn(16, 8).to(torch.bfloat16) for i in range(5)}
    planned = [OutTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardWriter(tmp_path, max_shard_bytes=600, plan=planned)
    for name, t in tensors.items():
        writer.write(name, t)
    index = writer.finish()
    assert len(set(index["weight_map"].values())) == 3  # 256-byte tensors, 600-byte shards -> 2 + 2 + 1
    ckpt = Checkpoint(tmp_path)
    assert ckpt.names() == list(tensors)
    for name, t in tensors.items():
        assert torch.equal(ckpt.get(name), t)
    # our shards are valid for the reference implementation too
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / index["weight_map"]["t4"])["t4"], tensors["t4"])


def test_bin_checkpoint_loads_only_with_weights_only(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save({"w": torch.ones(3)}, folder / "pytorch_model.bin")
    assert torch.equal(Checkpoint(folder).get("w"), torch.ones(3))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"w": Evil()}, evil / "pytorch_model.bin")
    with pytest.raises(MergeqError, match="weights_only=True"):
        Checkpoint(evil)
