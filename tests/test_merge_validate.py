"""Built-in validation with several weighted adapters, and the cases PEFT cannot run unmerged."""

from __future__ import annotations

from merge.merger import AdapterRef, MergeConfig, run_merge
from merge.validate import Reference, compare_candidates


def test_weighted_adapters_validate_against_peft(tmp_path, builders):
    base = builders.llama(tmp_path / "base")
    a = builders.adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=12, target_modules=["q_proj", "up_proj"])
    b = builders.adapter(
        base, tmp_path / "b", seed=2, r=8, lora_alpha=4, use_dora=True, target_modules=["v_proj", "down_proj"]
    )
    result = run_merge(
        MergeConfig(base=base, adapters=[AdapterRef(a, 0.7), AdapterRef(b, 1.0)], out=tmp_path / "o", dtype="float32")
    )
    validation = result.manifest["validation"]
    assert validation["ok"] and validation["mean_kl"] < 1e-9 and validation["max_abs_logit_delta"] < 1e-4, validation
    # the reference honours the weights: the same merge checked against weights (1, 1) is flagged
    reference = Reference(base=base, adapters=[AdapterRef(a, 1.0), AdapterRef(b, 1.0)])
    outcome = compare_candidates(reference, {"base": tmp_path / "o"}, kl_warn=1e-6, logit_warn=1e-3)
    assert outcome.results["base"]["ok"] is False and outcome.warnings


def test_weighted_dora_cannot_be_run_unmerged(tmp_path, builders):
    base = builders.llama(tmp_path / "base")
    dora = builders.adapter(base, tmp_path / "d", r=4, lora_alpha=12, use_dora=True, target_modules=["q_proj"])
    result = run_merge(MergeConfig(base=base, adapters=[AdapterRef(dora, 0.5)], out=tmp_path / "o"))
    assert "DoRA" in result.manifest["validation"]["skipped"]
    assert any(w.startswith("validation skipped") for w in result.warnings)


def test_adapters_recording_different_bases_warn(tmp_path, builders):
    import json

    base = builders.llama(tmp_path / "base")
    a = builders.adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=12, target_modules=["q_proj"])
    b = builders.adapter(base, tmp_path / "b", seed=2, r=4, lora_alpha=12, target_modules=["v_proj"])
    config = json.loads((b / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/another-model"
    (b / "adapter_config.json").write_text(json.dumps(config))
    result = run_merge(
        MergeConfig(base=base, adapters=[AdapterRef(a, 0.5), AdapterRef(b, 0.5)], out=tmp_path / "o", validate=False)
    )
    assert any("record different bases" in w and "some-org/another-model" in w for w in result.warnings)
    assert result.manifest["warnings"] == result.warnings
