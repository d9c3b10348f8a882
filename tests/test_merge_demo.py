"""End to end on the embedded demo: the real SmolLM2 base, its NF4 twin, and the QLoRA-trained demo adapter."""

from __future__ import annotations

import json

import pytest

from merge.merger import AdapterRef, MergeConfig, run_merge
from mergeq.cli import main

pytestmark = pytest.mark.demo


@pytest.fixture(scope="module")
def assets():
    from mergeq.demo import demo_assets

    return demo_assets()


def test_demo_qlora_merge_chooses_the_faithful_target(tmp_path, assets):
    out = tmp_path / "merged"
    result = run_merge(
        MergeConfig(
            base=assets.base,
            qlora_base=assets.base_nf4,
            adapters=[AdapterRef(assets.adapter)],
            out=out,
            dtype="float16",
            eval_text=assets.eval_text,
        )
    )
    manifest = json.loads((out / "merge_manifest.json").read_text())
    fidelity = manifest["qlora_fidelity"]
    kl = {k: v["mean_kl"] for k, v in fidelity["candidates"].items()}
    # the adapter was trained against the NF4 weights: merging into their dequantized values stays faithful
    assert fidelity["chosen"] == "qlora-base" and kl["qlora-base"] < kl["base"], fidelity
    assert kl["qlora-base"] < 0.01, kl
    validation = manifest["validation"]
    assert "4-bit" in validation["reference"] and validation["prompt_source"].startswith("tokenizer")
    assert result.validation == validation
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"
    copied = set(manifest["output"]["copied_files"])
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= copied
    sources = manifest["inputs"]["sources"]
    assert sources["qlora-base"]["kind"] == "bnb-4bit" and sources["qlora-base"]["quantized_tensors"] > 100
    adapter = manifest["inputs"]["adapters"][0]
    assert adapter["config"]["peft_type"] == "LORA" and adapter["scales"]
    assert (out / "merge_manifest.json").is_file() and not list(out.glob(".candidate-*"))


def test_demo_merged_model_loads_and_chats(tmp_path, assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    code = main(
        [
            "-q",
            "merge",
            "--base",
            str(assets.base_nf4),
            "--adapter",
            str(assets.adapter),
            "--out",
            str(out),
            "--no-validate",
        ]
    )
    assert code == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does os.path.join do?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]
