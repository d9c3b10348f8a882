"""QLoRA detection: each kind of evidence alone and combined, the decision, and the merge it leads to."""

from __future__ import annotations

import json

import pytest

from merge.qlora_detect import adapter_evidence, decide, from_name, user_base_evidence
from mergeq.core.errors import MergeqError

CARD = """---
library_name: peft
---
## Training procedure


The following `bitsandbytes` quantization config was used during training:
- quant_method: bitsandbytes
- load_in_8bit: False
- load_in_4bit: True
- llm_int8_threshold: 6.0
- bnb_4bit_quant_type: {quant_type}
- bnb_4bit_use_double_quant: True
- bnb_4bit_compute_dtype: bfloat16

### Framework versions

- PEFT 0.6.2
"""


def adapter_dir(tmp_path, name="adapter", base="meta-llama/Llama-3.2-1B", **files):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    for filename, text in files.items():
        (folder / filename.replace("__", ".")).write_text(text)
    return folder


def evidence_of(folder):
    return adapter_evidence(folder, json.loads((folder / "adapter_config.json").read_text()))


@pytest.mark.parametrize(
    "name, four_bit, quant_type",
    [
        ("unsloth/llama-3-8b-bnb-4bit", True, None),
        ("unsloth/Meta-Llama-3.1-8B-Instruct-unsloth-bnb-4bit", True, None),
        ("someone/mistral-7b-4bit", True, None),
        ("someone/Qwen2.5-7B-nf4", True, "nf4"),
        ("TheBloke/Llama-2-7B-GPTQ", False, None),
        ("meta-llama/Llama-3.2-1B", None, None),
        ("someone/model-4bitnet", None, None),
    ],
)
def test_base_name(name, four_bit, quant_type):
    found = from_name(name, "adapter_config.json")
    if four_bit is None:
        assert found is None
    else:
        assert found.four_bit is four_bit and found.quant_type == quant_type, found


def test_recorded_local_base_that_is_4bit(tmp_path):
    base = tmp_path / "mybase"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps(
            {
                "quantization_config": {
                    "quant_method": "bitsandbytes",
                    "load_in_4bit": True,
                    "bnb_4bit_quant_type": "fp4",
                    "bnb_4bit_use_double_quant": False,
                }
            }
        )
    )
    found = from_name(str(base), "adapter_config.json")
    assert found.four_bit and found.quant_type == "fp4" and found.double_quant is False


def test_each_file_alone(tmp_path):
    qc = {
        "quantization_config": {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16",
        }
    }
    cases = {
        "config.json": adapter_dir(tmp_path, "a", config__json=json.dumps(qc)),
        "model card": adapter_dir(tmp_path, "b", README__md=CARD.format(quant_type="nf4")),
        "trainer config": adapter_dir(tmp_path, "c", qlora__yml="base_model: x\nadapter: qlora\nload_in_4bit: true\n"),
        "base_model_name_or_path": adapter_dir(tmp_path, "d", base="unsloth/llama-3-8b-bnb-4bit"),
    }
    for source, folder in cases.items():
        found = evidence_of(folder)
        assert [e.source for e in found] == [source], found
        assert found[0].four_bit
    assert evidence_of(cases["config.json"])[0].compute_dtype == "bfloat16"
    assert evidence_of(cases["model card"])[0].double_quant is True
    assert evidence_of(adapter_dir(tmp_path, "none")) == []


def test_trl_model_arguments(tmp_path):
    folder = adapter_dir(
        tmp_path,
        model_args__json=json.dumps(
            {
                "model_name_or_path": "x",
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "fp4",
                "use_bnb_nested_quant": False,
            }
        ),
    )
    (found,) = evidence_of(folder)
    assert found.quant_type == "fp4" and found.double_quant is False


def test_combined_evidence_agrees(tmp_path):
    folder = adapter_dir(tmp_path, base="unsloth/llama-3-8b-bnb-4bit", README__md=CARD.format(quant_type="nf4"))
    evidence = evidence_of(folder)
    assert {e.source for e in evidence} == {"base_model_name_or_path", "model card"}
    decision = decide("auto", evidence, has_4bit_base=False)
    assert decision.settings.quant_type == "nf4" and decision.settings.double_quant is True
    assert decision.warnings == []
    assert len(decision.describe()["evidence"]) == 2


def test_evidence_that_disagrees_warns_and_says_how_to_choose(tmp_path):
    folder = adapter_dir(tmp_path, base="someone/model-fp4", README__md=CARD.format(quant_type="nf4"))
    decision = decide("auto", evidence_of(folder), has_4bit_base=False)
    text = " ".join(decision.warnings)
    assert "disagrees on the quant type (fp4, nf4)" in text and "--qlora fp4" in text and "--qlora off" in text
    assert decision.settings.quant_type == "nf4"


def test_name_only_says_the_quant_type_is_assumed():
    decision = decide("auto", [from_name("unsloth/llama-3-8b-bnb-4bit", "x")], has_4bit_base=False)
    assert decision.settings.quant_type == "nf4"
    assert any("nothing says whether the base was NF4 or FP4" in w for w in decision.warnings)
    assert any("double quantization" in w for w in decision.warnings)


def test_modes():
    nothing = decide("auto", [], has_4bit_base=False)
    assert nothing.settings is None and not nothing.trained_on_4bit and "--qlora nf4" in nothing.why
    forced = decide("fp4", [], has_4bit_base=False, double_quant=False)
    assert forced.settings.quant_type == "fp4" and forced.settings.double_quant is False
    evidence = [from_name("unsloth/llama-3-8b-bnb-4bit", "x")]
    off = decide("off", evidence, has_4bit_base=False)
    assert off.settings is None and "--qlora off" in off.warnings[0]
    given = decide("auto", evidence + [user_base_evidence("b", None, "--qlora-base")], has_4bit_base=True)
    assert given.settings is None and given.target == "4-bit base given"
    with pytest.raises(MergeqError, match="--qlora 'int4'"):
        decide("int4", [], has_4bit_base=False)


def test_only_the_model_name_counts(tmp_path):
    plain = tmp_path / "runs_4bit" / "base"
    plain.mkdir(parents=True)
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert from_name(str(plain), "x") is None  # a local fp16 checkpoint: its config says it is not quantized
    assert from_name("/nowhere/exp_4bit/llama", "x") is None
    assert from_name("unsloth-4bit-models/llama", "x") is None
