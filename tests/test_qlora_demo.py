"""The demo's real path: a QLoRA-trained adapter, only the fp16 base given, the NF4 base rebuilt on the fly."""

from __future__ import annotations

import json

import pytest
import torch

from merge.merger import AdapterRef, MergeConfig, run_merge
from merge.qlora import QuantSettings
from merge.source import Source
from merge.target import choose_target

pytestmark = pytest.mark.demo


@pytest.fixture(scope="module")
def assets():
    from mergeq.demo import demo_assets

    return demo_assets()


def test_demo_adapter_is_detected_as_qlora(tmp_path, assets):
    result = run_merge(
        MergeConfig(base=assets.base, adapters=[AdapterRef(assets.adapter)], out=tmp_path / "m", validate=False)
    )
    qlora = json.loads((tmp_path / "m" / "merge_manifest.json").read_text())["qlora"]
    assert qlora == result.manifest["qlora"]
    assert qlora["target"] == "fp16 base requantized to nf4 (double quant)" and qlora["trained_on_4bit"]
    sources = {e["source"]: e for e in qlora["evidence"]}
    assert set(sources) == {"base_model_name_or_path", "config.json"}
    assert all(e["quant_type"] == "nf4" and e["double_quant"] is True for e in sources.values())
    assert not [w for w in result.warnings if w.startswith("QLoRA")]  # the evidence agrees: nothing to warn about


def test_demo_rebuilt_target_stays_at_the_trained_model(assets):
    """KL to the trained model (NF4 base + unmerged adapter) on the demo evaluation text: the merge into the
    rebuilt NF4 weights stays <= 1e-3; the merge into the fp16 weights does not."""
    refs = [AdapterRef(assets.adapter)]
    rebuilt = Source(assets.base, "rebuilt-nf4", refs, torch.float16, QuantSettings("nf4", 64, True))
    plain = Source(assets.base, "fp16", refs, torch.float16)
    reference = Source(assets.base_nf4, "reference", refs, torch.float32)
    try:
        choice = choose_target([rebuilt, plain], reference, assets.eval_text, [assets.base])
    finally:
        for source in (rebuilt, plain, reference):
            source.close()
    kl = {k: v["mean_kl"] for k, v in choice.candidates.items()}
    print("demo target KL:", choice.candidates, choice.scored_tokens)
    assert choice.chosen == "rebuilt-nf4" and kl["rebuilt-nf4"] <= 1e-3, kl
    assert kl["fp16"] > 10 * kl["rebuilt-nf4"], kl
    assert choice.scored_tokens == 4 * 255
