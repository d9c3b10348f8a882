"""Streaming and determinism: equal inputs give byte-identical outputs; shards and index. (Peak memory is bounded
by a hard limit in tests/test_memory_limit.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merge.merger import AdapterRef, MergeConfig, run_merge
from mergeq.core.shards import OutTensor, ShardWriter


def _all_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_outputs_are_byte_identical(tmp_path, builders):
    base = builders.llama(tmp_path / "base", dtype=torch.float16)
    adapter = builders.adapter(
        base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        modules_to_save=["lm_head"],
    )
    outs = []
    for name in ("one", "two"):
        run_merge(MergeConfig(base=base, adapters=[AdapterRef(adapter)], out=tmp_path / name))
        outs.append(_all_bytes(tmp_path / name))
    assert outs[0].keys() == outs[1].keys()
    for name in outs[0]:
        assert outs[0][name] == outs[1][name], f"{name} differs between two identical merges"
    manifest = json.loads(outs[0]["merge_manifest.json"])
    assert manifest["validation"]["mean_kl"] < 1e-3, manifest["validation"]
    files = manifest["inputs"]["sources"]["base"]["files"]
    assert set(files) == {p.name for p in base.iterdir()} and all(len(h) == 64 for h in files.values())
    assert manifest["inputs"]["adapters"][0]["config"]["use_dora"] is True
    assert manifest["inputs"]["adapters"][0]["scales"]["model.layers.0.self_attn.q_proj"] == 2.0
    assert manifest["versions"]["torch"] == torch.__version__


def test_shards_and_index(tmp_path, builders):
    base = builders.llama(tmp_path / "base")
    adapter = builders.adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    result = run_merge(
        MergeConfig(
            base=base, adapters=[AdapterRef(adapter)], out=tmp_path / "out", validate=False, max_shard_bytes=20_000
        )
    )
    assert len(result.shards) >= 3
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.shards)
    original = load_file(base / "model.safetensors")
    assert set(index["weight_map"]) == set(original)
    for shard in result.shards:
        for name, tensor in load_file(tmp_path / "out" / shard).items():
            assert tensor.dtype == torch.float16 and tensor.shape == original[name].shape
    # the same base stored as shards + index merges to the same bytes as the single file
    sharded = tmp_path / "base-sharded"
    sharded.mkdir()
    (sharded / "config.json").write_bytes((base / "config.json").read_bytes())
    writer = ShardWriter(sharded, 30_000, plan=[OutTensor(n, t.dtype, tuple(t.shape)) for n, t in original.items()])
    for name, tensor in original.items():
        writer.write(name, tensor)
    writer.finish()
    again = run_merge(
        MergeConfig(
            base=sharded, adapters=[AdapterRef(adapter)], out=tmp_path / "again", validate=False, max_shard_bytes=20_000
        )
    )
    for shard in result.shards:
        assert (tmp_path / "out" / shard).read_bytes() == (tmp_path / "again" / shard).read_bytes()
    assert again.manifest["inputs"]["sources"]["base"]["format"] == "safetensors"


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_validation_numbers_are_recorded(tmp_path, builders, weight):
    base = builders.llama(tmp_path / "base")
    adapter = builders.adapter(base, tmp_path / "adapter", r=4, lora_alpha=12, target_modules=["q_proj", "up_proj"])
    result = run_merge(MergeConfig(base=base, adapters=[AdapterRef(adapter, weight)], out=tmp_path / "out"))
    validation = result.manifest["validation"]
    assert validation["positions"] > 0 and validation["ok"] is True
    assert 0 <= validation["mean_kl"] < 1e-4 and validation["max_abs_logit_delta"] < 0.05
    # a threshold the fp16 cast cannot meet is reported as a warning
    strict = run_merge(
        MergeConfig(
            base=base, adapters=[AdapterRef(adapter, weight)], out=tmp_path / "strict", kl_warn=0.0, logit_warn=0.0
        )
    )
    assert strict.manifest["validation"]["ok"] is False
    assert any("differs from the unmerged reference" in w for w in strict.warnings)


def test_bin_base_merges_like_safetensors(tmp_path, builders):
    base = builders.llama(tmp_path / "base")
    adapter = builders.adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    pickled = tmp_path / "base-bin"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((base / "config.json").read_bytes())
    torch.save(load_file(base / "model.safetensors"), pickled / "pytorch_model.bin")
    a = run_merge(MergeConfig(base=base, adapters=[AdapterRef(adapter)], out=tmp_path / "a", validate=False))
    b = run_merge(MergeConfig(base=pickled, adapters=[AdapterRef(adapter)], out=tmp_path / "b", validate=False))
    assert b.manifest["inputs"]["sources"]["base"]["format"] == "bin"
    for shard in a.shards:
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
