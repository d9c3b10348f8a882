"""`mergeq merge` against PEFT on a tiny random model of every family (tests/family_models.py), in fp32.

For each family: every tensor of our merged checkpoint equals what PEFT's merge_and_unload saves (same on-disk names,
max abs difference <= 1e-5), and the merged model's logits equal the unmerged PeftModel's. Gemma 2 and 3 alternate
sliding and global layers and the inputs are longer than the window, so both layer kinds count in the logits.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from family_models import EXPERT_PARAMETERS, FAMILIES, LINEAR_TARGETS, MOE_FAMILIES, family_model
from safetensors.torch import load_file
from test_merge_peft import assert_close, ours
from tiny_models import make_adapter

from mergeq.core.errors import MergeqError

IDS = torch.tensor([[1, 3, 5, 9, 17, 40, 50, 60, 70, 80, 90, 4]])  # 12 tokens, the sliding window is 4
LOGITS_TOL = 1e-4


def peft_saved(base, adapter, folder) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload, saved by transformers (its on-disk names, tied tensors once)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def logits_gap(base, adapter, merged) -> tuple[float, float]:
    """(max |merged - unmerged PeftModel|, max |base - unmerged PeftModel|) over the logits of IDS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    ours_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        want = reference(IDS).logits
        return float((ours_model(IDS).logits - want).abs().max()), float((plain(IDS).logits - want).abs().max())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_linear_lora_matches_peft(tmp_path, family):
    """LoRA on every Linear of the family (Phi-3: the fused qkv_proj and gate_up_proj; MoE: attention)."""
    base = family_model(tmp_path / "base", family)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=12, target_modules=LINEAR_TARGETS[family])
    expected = peft_saved(base, adapter, tmp_path / "peft")
    got = ours(base, [(adapter, 1.0)], tmp_path / "out")
    assert set(got) == set(expected), "our checkpoint and PEFT's have different tensor names"
    assert_close(expected, got)
    base_sd = load_file(base / "model.safetensors")
    assert sum(not torch.equal(base_sd[n], got[n]) for n in got) >= 2 * len(LINEAR_TARGETS[family])
    merged_gap, adapter_effect = logits_gap(base, adapter, tmp_path / "out")
    assert merged_gap < LOGITS_TOL, (family, merged_gap)
    assert adapter_effect > 100 * LOGITS_TOL, "the adapter changes nothing: the test would not catch a no-op"


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_tied_embeddings(tmp_path, family):
    """Gemma ties lm_head to the scaled input embedding. A LoRA that leaves the embedding alone keeps the tie (one
    tensor on disk); trainable token rows and modules_to_save on the embedding are merged as PEFT computes them."""
    base = family_model(tmp_path / "base", family)
    cases = {
        "lora": (dict(target_modules=LINEAR_TARGETS[family]), True),
        "tokens": (dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 40]), True),
        "embed_saved": (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), False),
        "lora_embed": (dict(target_modules=["embed_tokens", "q_proj"]), False),
    }
    for name, (kw, stays_tied) in cases.items():
        adapter = make_adapter(base, tmp_path / f"a-{name}", r=4, lora_alpha=12, **kw)
        out = tmp_path / f"out-{name}"
        got = ours(base, [(adapter, 1.0)], out)
        assert ("lm_head.weight" not in got) == stays_tied, name
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == stays_tied, name
        merged_gap, adapter_effect = logits_gap(base, adapter, out)
        assert merged_gap < LOGITS_TOL and adapter_effect > 100 * LOGITS_TOL, (name, merged_gap, adapter_effect)
        if name == "lora_embed":
            # PEFT's merge_and_unload adds the delta to the shared tensor, so its head moves too (the unmerged
            # model's head does not); ours unties: the embedding is PEFT's merged one, the head the base one
            expected = peft_saved(base, adapter, tmp_path / f"peft-{name}")
            assert_close({"model.embed_tokens.weight": expected["model.embed_tokens.weight"]}, got)
            base_embedding = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
            assert torch.equal(got["lm_head.weight"], base_embedding)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_lora_on_fused_parameters_matches_peft(tmp_path, family):
    """PEFT's target_parameters LoRA on the fused expert tensors (transformers 5: gate_up_proj and down_proj, 3-D in
    memory) lands on the per-expert tensors the checkpoint stores on disk, as PEFT's merge saves them."""
    base = family_model(tmp_path / "base", family)
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=12,
        target_modules=LINEAR_TARGETS[family],
        target_parameters=EXPERT_PARAMETERS,
    )
    expected = peft_saved(base, adapter, tmp_path / "peft")
    got = ours(base, [(adapter, 1.0)], tmp_path / "out")
    assert set(got) == set(expected)
    assert_close(expected, got)
    base_sd = load_file(base / "model.safetensors")
    experts = [n for n in got if ".experts." in n]
    assert len(experts) == 2 * 4 * 3 and all(not torch.equal(base_sd[n], got[n]) for n in experts)
    merged_gap, adapter_effect = logits_gap(base, adapter, tmp_path / "out")
    assert merged_gap < LOGITS_TOL and adapter_effect > 100 * LOGITS_TOL, (merged_gap, adapter_effect)


def test_lora_on_a_plain_parameter_matches_peft(tmp_path):
    """target_parameters on 2-D weights (no experts): the same delta as a LoRA on the module."""
    base = family_model(tmp_path / "base", "llama")
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=12,
        target_modules=[],
        target_parameters=["self_attn.q_proj.weight", "mlp.down_proj.weight"],
    )
    expected = peft_saved(base, adapter, tmp_path / "peft")
    got = ours(base, [(adapter, 1.0)], tmp_path / "out")
    assert_close(expected, got)
    base_sd = load_file(base / "model.safetensors")
    assert sum(not torch.equal(base_sd[n], got[n]) for n in got) == 4


def test_expert_lora_without_a_known_layout_is_refused(tmp_path, monkeypatch):
    """Per-expert tensors on disk in a layout mergeq has no entry for: refused, naming the adapter, the parameter
    and how to merge it with PEFT; nothing is written."""
    import merge.experts

    base = family_model(tmp_path / "base", "mixtral")
    adapter = make_adapter(
        base, tmp_path / "adapter", r=4, lora_alpha=12, target_modules=["q_proj"], target_parameters=EXPERT_PARAMETERS
    )
    monkeypatch.delitem(merge.experts.EXPERT_LAYOUTS, "mixtral")
    with pytest.raises(MergeqError) as err:
        ours(base, [(adapter, 1.0)], tmp_path / "out")
    message = str(err.value)
    assert str(adapter) in message and "model.layers.0.mlp.experts.gate_up_proj" in message and "mixtral" in message
    assert "merge_and_unload" in err.value.hint
    assert not (tmp_path / "out").exists()
