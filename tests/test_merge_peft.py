"""Our streaming merge against PEFT's own merge_and_unload, in fp32, on tiny random Llama and GPT-2 models.

Every adapter variant has lora_alpha != r so a wrong scale cannot pass. Max abs weight difference <= 1e-5.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from merge.merger import AdapterRef, MergeConfig, run_merge

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-5


def merged_tensors(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / shard))
    assert set(out) == set(index["weight_map"])
    return out


def peft_merged(base, adapter, resize_to=None) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if resize_to:
        model.resize_token_embeddings(resize_to, mean_resizing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def ours(base, adapters, out, **kw) -> dict[str, torch.Tensor]:
    refs = [AdapterRef(a, w) for a, w in adapters]
    run_merge(MergeConfig(base=base, adapters=refs, out=out, dtype="float32", validate=False, **kw))
    return merged_tensors(out)


def assert_close(expected: dict, got: dict, tied_pairs=()):
    for name, want in expected.items():
        have = got.get(name)
        if have is None:
            for head, emb in tied_pairs:
                if name == head:
                    have = got[emb]
        assert have is not None, f"{name} missing from the merged output"
        assert have.shape == want.shape, name
        diff = float((have.float() - want.float()).abs().max()) if want.numel() else 0.0
        assert diff <= TOL, f"{name}: max abs diff {diff}"


LLAMA_VARIANTS = {
    "lora": dict(r=4, lora_alpha=12, target_modules=LLAMA_LINEAR),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=LLAMA_LINEAR),
    "patterns": dict(
        r=4,
        lora_alpha=12,
        target_modules=LLAMA_LINEAR,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, "o_proj": 20},
    ),
    "dora": dict(r=4, lora_alpha=12, use_dora=True, target_modules=LLAMA_LINEAR),
    "modules_to_save": dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "lora_embedding": dict(r=4, lora_alpha=12, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    "dora_embedding": dict(r=4, lora_alpha=12, use_dora=True, target_modules=["embed_tokens", "up_proj"]),
    "trainable_tokens": dict(r=4, lora_alpha=12, target_modules=["q_proj"], trainable_token_indices=[3, 7, 11]),
}


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_llama_variant_matches_peft(tmp_path, builders, variant):
    base = builders.llama(tmp_path / "base")
    adapter = builders.adapter(base, tmp_path / "adapter", **LLAMA_VARIANTS[variant])
    expected = peft_merged(base, adapter)
    got = ours(base, [(adapter, 1.0)], tmp_path / "out")
    assert_close(expected, got)
    changed = [
        n
        for n in expected
        if n in got and not torch.equal(load_file(base / "model.safetensors").get(n, got[n]), got[n])
    ]
    assert changed, "the merge changed nothing: the test would not catch a no-op"


@pytest.mark.parametrize("modules", [["embed_tokens", "lm_head"], "lora_embed"])
def test_llama_resized_vocabulary(tmp_path, builders, modules):
    base = builders.llama(tmp_path / "base", vocab=96)
    if modules == "lora_embed":  # LoRA on the resized embedding: PEFT saves the resized base layer with the adapter
        kw = dict(r=4, lora_alpha=12, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"])
    else:
        kw = dict(r=4, lora_alpha=12, target_modules=["q_proj"], modules_to_save=modules)
    adapter = builders.adapter(base, tmp_path / "adapter", resize_to=104, **kw)
    expected = peft_merged(base, adapter, resize_to=104)
    got = ours(base, [(adapter, 1.0)], tmp_path / "out")
    assert got["model.embed_tokens.weight"].shape[0] == 104
    assert_close(expected, got)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 104


GPT2_VARIANTS = {
    "fan_in_fan_out": dict(r=4, lora_alpha=16, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
    "dora_fan_in_fan_out": dict(
        r=4, lora_alpha=16, fan_in_fan_out=True, use_dora=True, target_modules=["c_attn", "c_fc"]
    ),
    "lora_bias": dict(r=4, lora_alpha=16, fan_in_fan_out=True, lora_bias=True, target_modules=["c_attn", "c_proj"]),
    "rslora_patterns": dict(
        r=4,
        lora_alpha=16,
        fan_in_fan_out=True,
        use_rslora=True,
        target_modules=["c_attn", "c_fc"],
        rank_pattern={"h.0.attn.c_attn": 8},
    ),
}


@pytest.mark.parametrize("variant", sorted(GPT2_VARIANTS))
def test_gpt2_conv1d_matches_peft(tmp_path, builders, variant):
    base = builders.gpt2(tmp_path / "base")
    adapter = builders.adapter(base, tmp_path / "adapter", **GPT2_VARIANTS[variant])
    expected = peft_merged(base, adapter)
    got = ours(base, [(adapter, 1.0)], tmp_path / "out")
    assert "lm_head.weight" not in got, "GPT-2 ties lm_head to wte and the merge left both alone"
    assert_close(expected, got, tied_pairs=[("lm_head.weight", "transformer.wte.weight")])


def test_several_adapters_are_summed_with_weights(tmp_path, builders):
    base = builders.llama(tmp_path / "base")
    a = builders.adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=12, target_modules=LLAMA_LINEAR)
    b = builders.adapter(
        base, tmp_path / "b", seed=2, r=2, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "down_proj"]
    )
    c = builders.adapter(base, tmp_path / "c", seed=3, r=4, lora_alpha=12, use_dora=True, target_modules=["v_proj"])
    weights = {a: 0.7, b: -0.3, c: 0.5}
    base_sd = load_file(base / "model.safetensors")
    expected = {k: v.clone() for k, v in base_sd.items()}
    for adapter, w in weights.items():
        single = peft_merged(base, adapter)
        for k in expected:
            expected[k] += w * (single[k] - base_sd[k])
    got = ours(base, list(weights.items()), tmp_path / "out")
    assert_close(expected, got)


def test_tied_embeddings_kept_or_split(tmp_path, builders):
    """lm_head is written on its own only when the merge makes it differ from the input embedding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = builders.llama(tmp_path / "base", tie=True)
    cases = {
        "tokens": (dict(r=4, lora_alpha=12, target_modules=["q_proj"], trainable_token_indices=[3, 5]), True),
        "lora_only": (dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"]), True),
        "embed_saved": (dict(r=4, lora_alpha=12, target_modules=["q_proj"], modules_to_save=["embed_tokens"]), False),
        "lora_embed": (dict(r=4, lora_alpha=12, target_modules=["embed_tokens", "q_proj"]), False),
    }
    ids = torch.tensor([[1, 3, 5, 9, 17, 40]])
    for name, (kw, stays_tied) in cases.items():
        adapter = builders.adapter(base, tmp_path / f"a-{name}", **kw)
        out = tmp_path / f"out-{name}"
        got = ours(base, [(adapter, 1.0)], out)
        config = json.loads((out / "config.json").read_text())
        assert ("lm_head.weight" not in got) == stays_tied, name
        assert config["tie_word_embeddings"] == stays_tied, name
        # the merged model computes what the trained (unmerged) PEFT model computes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
            )
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            diff = float((reference(ids).logits - merged(ids).logits).abs().max())
        assert diff < 1e-4, (name, diff)
