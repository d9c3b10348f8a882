"""QLoRA bases: bitsandbytes 4-bit checkpoints quantized on the CPU, dequantized by our code, merged, validated."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge.merger import AdapterRef, MergeConfig, run_merge
from merge.qlora import QuantSettings, dequantize, quantized_weights
from mergeq.core.checkpoint import Checkpoint
from mergeq.core.errors import MergeqError


def quantize_checkpoint(src, dst, quant_type="nf4", double_quant=True):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")
        model.save_pretrained(dst)
    return dst


def merged_tensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / shard))
    return out


def bnb_generic_dequantize(packed, state):
    """bitsandbytes' device-independent dequantization (its CPU C kernel in 0.50.2 mis-indexes blocks when a
    row length is not a multiple of the blocksize, e.g. 96 columns with blocksize 64)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.functional import dequantize_blockwise

    absmax = state.absmax
    if state.nested:
        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = state.code.to(torch.float32)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), code, state.blocksize, state.shape, state.dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("intermediate", [128, 96])
def test_dequantize_matches_bitsandbytes(tmp_path, builders, quant_type, double_quant, intermediate):
    from bitsandbytes.functional import QuantState, dequantize_4bit

    base = builders.llama(tmp_path / "base", hidden=64, intermediate=intermediate)
    q = quantize_checkpoint(base, tmp_path / "q", quant_type, double_quant)
    ckpt = Checkpoint(q)
    found = quantized_weights(ckpt.names())
    assert len(found) == 2 * 7  # every Linear of both layers; lm_head stays in full precision
    raw = load_file(q / "model.safetensors")
    original = load_file(base / "model.safetensors")
    for weight, state_key in found.items():
        ours = dequantize(ckpt, weight, state_key)
        parts = {k[len(weight) + 1 :]: v for k, v in raw.items() if k.startswith(weight + ".")}
        state = QuantState.from_dict(parts, device="cpu")
        aligned = state.shape[-1] % state.blocksize == 0
        theirs = dequantize_4bit(raw[weight], state) if aligned else bnb_generic_dequantize(raw[weight], state)
        assert torch.equal(ours, theirs), weight
        assert ours.shape == original[weight].shape
        # and it is a 4-bit approximation of the original, not garbage
        err = (ours - original[weight]).abs().max() / original[weight].abs().max()
        assert 0 < err < 0.25, (weight, float(err))


@pytest.fixture
def qlora_setup(tmp_path, builders):
    base = builders.llama(tmp_path / "base", hidden=64, intermediate=128)
    q = quantize_checkpoint(base, tmp_path / "base-nf4")
    adapter = builders.adapter(
        base,
        tmp_path / "adapter",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return base, q, adapter


def test_qlora_merge_is_faithful_to_the_4bit_model(tmp_path, qlora_setup):
    base, q, adapter = qlora_setup
    out = tmp_path / "out"
    result = run_merge(MergeConfig(base=None, qlora_base=q, adapters=[AdapterRef(adapter)], out=out, dtype="float32"))
    validation = result.manifest["validation"]
    assert "4-bit" in validation["reference"]
    assert validation["mean_kl"] < 1e-6 and validation["max_abs_logit_delta"] < 1e-2, validation
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = merged_tensors(out)
    assert not any(k.endswith(("absmax", "quant_map")) or "quant_state" in k for k in merged)
    # merged weight == bnb's dequantized weight + scale * B @ A
    ckpt = Checkpoint(q)
    name = "model.layers.1.mlp.down_proj.weight"
    dq = dequantize(ckpt, name, quantized_weights(ckpt.names())[name])
    lora = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    expected = dq + 2.0 * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
    assert float((merged[name] - expected).abs().max()) <= 1e-5


@pytest.fixture
def qlora_setup_with_text(tmp_path, builders):
    """A base with a byte-level tokenizer (vocabulary 256), its NF4 twin, an adapter and an evaluation text."""
    from int4_models import byte_tokenizer, calibration_text

    base = builders.llama(tmp_path / "base", hidden=64, intermediate=128, vocab=256)
    byte_tokenizer(base)
    q = quantize_checkpoint(base, tmp_path / "base-nf4")
    adapter = builders.adapter(
        base,
        tmp_path / "adapter",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return base, q, adapter, calibration_text(tmp_path / "eval.txt", chars=3000)


def test_both_bases_choose_by_measurement_and_write_once(tmp_path, qlora_setup_with_text, monkeypatch):
    from merge import merger

    base, q, adapter, text = qlora_setup_with_text
    written = []
    real = merger.stream_merge
    monkeypatch.setattr(merger, "stream_merge", lambda source, *a: written.append(source.label) or real(source, *a))
    out = tmp_path / "out"
    result = run_merge(MergeConfig(base=base, qlora_base=q, adapters=[AdapterRef(adapter)], out=out, eval_text=text))
    assert written == ["qlora-base"]  # one checkpoint written: the chosen one
    fidelity = result.manifest["qlora_fidelity"]
    kl = {k: v["mean_kl"] for k, v in fidelity["candidates"].items()}
    assert set(kl) == {"base", "qlora-base"}
    assert fidelity["chosen"] == "qlora-base" and kl["qlora-base"] < kl["base"] / 10, fidelity
    assert fidelity["text"]["file"] == str(text) and fidelity["text"]["format"] == "txt"
    assert fidelity["text"]["tokens"] == 3000 and fidelity["scored_tokens"] == 4 * 31
    assert "trained model" in fidelity["reference"]
    assert result.manifest["merge_target"] == "qlora-base"
    assert result.manifest["validation"]["mean_kl"] < 1e-3
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "merge_manifest.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # the same bytes as merging into the 4-bit base alone
    alone = run_merge(
        MergeConfig(base=None, qlora_base=q, adapters=[AdapterRef(adapter)], out=tmp_path / "alone", validate=False)
    )
    ta, tb = merged_tensors(out), merged_tensors(alone.out)
    assert all(torch.equal(ta[n], tb[n]) for n in ta)


def test_both_bases_without_a_text_is_an_error(tmp_path, qlora_setup):
    base, q, adapter = qlora_setup
    with pytest.raises(MergeqError, match="--eval-text FILE") as err:
        run_merge(MergeConfig(base=base, qlora_base=q, adapters=[AdapterRef(adapter)], out=tmp_path / "out"))
    assert "merge target is chosen by measuring" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_requantized_fp_base_equals_the_4bit_checkpoint(tmp_path, qlora_setup):
    base, q, adapter = qlora_setup
    a = run_merge(
        MergeConfig(
            base=base,
            adapters=[AdapterRef(adapter)],
            out=tmp_path / "a",
            dtype="float32",
            validate=False,
            requantize=QuantSettings("nf4", 64, True),
        )
    )
    b = run_merge(
        MergeConfig(
            base=None, qlora_base=q, adapters=[AdapterRef(adapter)], out=tmp_path / "b", dtype="float32", validate=False
        )
    )
    ta, tb = merged_tensors(a.out), merged_tensors(b.out)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert a.manifest["inputs"]["sources"]["base"]["requantized"]["tensors"] == 14


def _corrupt(q, edit):
    path = q / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


STATE = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"


def _set_state(tensors, **changes):
    meta = json.loads(bytes(tensors[STATE].numpy().tobytes()))
    meta.update(changes)
    tensors[STATE] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


@pytest.mark.parametrize(
    "case, edit, message",
    [
        (
            "missing absmax",
            lambda t: t.pop("model.layers.0.mlp.up_proj.weight.absmax"),
            "missing tensor model.layers.0.mlp.up_proj.weight.absmax",
        ),
        ("wrong blocksize", lambda t: _set_state(t, blocksize=128), "wrong blocksize"),
        ("bad blocksize", lambda t: _set_state(t, blocksize=100), "blocksize 100"),
        ("missing nested", lambda t: t.pop("model.layers.0.mlp.up_proj.weight.nested_absmax"), "nested_absmax"),
        ("bad shape", lambda t: _set_state(t, shape=[128, 65]), "packed bytes cannot hold"),
        ("garbage state", lambda t: t.__setitem__(STATE, torch.tensor([1, 2, 255], dtype=torch.uint8)), "not JSON"),
    ],
)
def test_corrupt_quant_state(tmp_path, qlora_setup, case, edit, message):
    base, q, adapter = qlora_setup
    _corrupt(q, edit)
    out = tmp_path / "out"
    with pytest.raises(MergeqError) as err:
        run_merge(MergeConfig(base=None, qlora_base=q, adapters=[AdapterRef(adapter)], out=out, validate=False))
    assert message in str(err.value), str(err.value)
    assert "model.layers.0.mlp.up_proj.weight" in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_requantized_target_is_validated_against_the_4bit_model(tmp_path, qlora_setup):
    base, _, adapter = qlora_setup
    result = run_merge(
        MergeConfig(
            base=base,
            adapters=[AdapterRef(adapter)],
            out=tmp_path / "out",
            dtype="float32",
            requantize=QuantSettings("nf4", 64, True),
        )
    )
    validation = result.manifest["validation"]
    assert "4-bit" in validation["reference"]
    assert validation["mean_kl"] < 1e-6, validation
    assert result.manifest["inputs"]["sources"]["base"]["requantized"]["quant_type"] == "nf4"


# ------------------------------------------------------------------ our own 4-bit quantization vs bitsandbytes'


def _bnb_device_independent_nested(absmax):
    """bitsandbytes' own device-independent blockwise 8-bit quantization (the torch path it ships as the default
    kernel), called past its CPU C kernel, which picks a neighbour of the nearest code for some values."""
    import bitsandbytes.functional as bnbf

    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    offset = absmax.mean()
    code = bnbf.create_dynamic_map()
    q, nested_absmax = op.redispatch(keys, absmax - offset, code, 256)
    return q, bnbf.QuantState(absmax=nested_absmax, code=code, blocksize=256, dtype=torch.float32), offset


def _bnb_roundtrip(weight, quant_type, double_quant, *, device_independent_nested=False):
    """bitsandbytes' quantize_4bit + dequantize_4bit on the CPU (its device-independent dequantization where
    its CPU kernel is wrong: an even last dimension that is not a multiple of the blocksize)."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    if double_quant and device_independent_nested:
        _, plain = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type=quant_type)
        state.absmax, state.state2, state.offset = _bnb_device_independent_nested(plain.absmax)
    if weight.shape[-1] % 2 == 0 and weight.shape[-1] % 64:
        return bnb_generic_dequantize(packed, state)
    return bnbf.dequantize_4bit(packed, state)


SHAPES = [(128, 64), (64, 128), (96, 64), (64, 96), (33, 17), (7,), (300, 576)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rebuilt_base_is_bit_identical_to_bitsandbytes(quant_type, double_quant, dtype):
    from merge.qlora import quantize_dequantize

    generator = torch.Generator().manual_seed(7)
    for shape in SHAPES:
        weight = (0.05 * torch.randn(shape, generator=generator)).to(dtype)
        weight.view(-1)[3] = 0.4  # an outlier: one block gets a large scale
        ours = quantize_dequantize(weight, QuantSettings(quant_type, 64, double_quant))
        theirs = _bnb_roundtrip(weight, quant_type, double_quant, device_independent_nested=True)
        assert ours.dtype == dtype and ours.shape == weight.shape
        assert torch.equal(ours, theirs), (shape, dtype)
        if not double_quant:  # without double quant even bitsandbytes' CPU kernels agree, code for code
            assert torch.equal(ours, _bnb_roundtrip(weight, quant_type, False)), shape


def test_our_tables_are_bitsandbytes_tables():
    import bitsandbytes.functional as bnbf

    from merge.qlora import code_table, dynamic_table

    assert torch.equal(code_table("nf4"), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code_table("fp4"), bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_table(), bnbf.create_dynamic_map())


def test_bitsandbytes_cpu_nested_codes_differ_only_by_one_step():
    """What the README documents: with double quantization, bitsandbytes' CPU C kernel gives some per-block
    scales the neighbouring 8-bit code; everything else is identical."""
    import bitsandbytes.functional as bnbf

    from merge.qlora import quantize_4bit

    weight = 0.05 * torch.randn((576, 1536), generator=torch.Generator().manual_seed(0))
    _, cpu_state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, ours = quantize_4bit(weight, QuantSettings("nf4", 64, True))
    differ = (ours.absmax.to(torch.int16) - cpu_state.absmax.to(torch.int16)).abs()
    assert 0 < int((differ > 0).sum()) < 0.01 * differ.numel()
    assert int(differ.max()) == 1


def _record_base(adapter, name):
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = name
    path.write_text(json.dumps(config))


def test_detected_qlora_adapter_rebuilds_the_trained_base(tmp_path, qlora_setup):
    """Only the fp16 base given, an adapter whose config names a 4-bit base: the merge goes into the rebuilt
    NF4 weights (the same bytes as merging into the 4-bit checkpoint), and the manifest says why."""
    base, q, adapter = qlora_setup
    _record_base(adapter, "unsloth/tiny-llama-bnb-4bit")
    (adapter / "config.json").write_text(
        json.dumps(
            {
                "quantization_config": {
                    "quant_method": "bitsandbytes",
                    "load_in_4bit": True,
                    "bnb_4bit_quant_type": "nf4",
                    "bnb_4bit_use_double_quant": True,
                }
            }
        )
    )
    auto = run_merge(
        MergeConfig(base=base, adapters=[AdapterRef(adapter)], out=tmp_path / "auto", dtype="float32", validate=False)
    )
    qlora = auto.manifest["qlora"]
    assert qlora["trained_on_4bit"] and qlora["target"] == "fp16 base requantized to nf4 (double quant)"
    assert {e["source"] for e in qlora["evidence"]} == {"base_model_name_or_path", "config.json"}
    assert qlora["settings"] is not None and auto.manifest["inputs"]["sources"]["base"]["requantized"]["tensors"] == 14
    into_q = run_merge(
        MergeConfig(
            base=None, qlora_base=q, adapters=[AdapterRef(adapter)], out=tmp_path / "q", dtype="float32", validate=False
        )
    )
    ta, tq = merged_tensors(auto.out), merged_tensors(into_q.out)
    assert all(torch.equal(ta[name], tq[name]) for name in ta)
    off = run_merge(
        MergeConfig(
            base=base,
            adapters=[AdapterRef(adapter)],
            out=tmp_path / "off",
            dtype="float32",
            validate=False,
            qlora="off",
        )
    )
    assert off.manifest["qlora"]["settings"] is None
    assert any("--qlora off" in w for w in off.warnings)
    assert "requantized" not in off.manifest["inputs"]["sources"]["base"]


def test_plain_adapter_is_merged_into_the_fp16_base(tmp_path, qlora_setup):
    base, _, adapter = qlora_setup
    result = run_merge(
        MergeConfig(base=base, adapters=[AdapterRef(adapter)], out=tmp_path / "out", dtype="float32", validate=False)
    )
    assert result.manifest["qlora"]["target"] == "fp16 base" and result.manifest["qlora"]["evidence"] == []
    assert "requantized" not in result.manifest["inputs"]["sources"]["base"]


def test_cli_both_bases_need_a_text_and_print_the_choice(tmp_path, qlora_setup_with_text, capsys):
    from mergeq.cli import main

    base, q, adapter, text = qlora_setup_with_text
    argv = ["merge", "--base", str(base), "--qlora-base", str(q), "--adapter", str(adapter), "--no-validate"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 2
    assert "no evaluation text given: pass --eval-text FILE" in capsys.readouterr().err
    assert main(argv + ["--out", str(tmp_path / "b"), "--eval-text", str(text), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["qlora_fidelity"]["chosen"] == "qlora-base"
    assert json.loads((tmp_path / "b" / "merge_manifest.json").read_text())["qlora"]["target"] == "4-bit base given"


def test_a_4bit_base_given_is_the_evidence(tmp_path, qlora_setup):
    _, q, adapter = qlora_setup
    result = run_merge(
        MergeConfig(base=q, adapters=[AdapterRef(adapter)], out=tmp_path / "out", validate=False, qlora="fp4")
    )
    qlora = result.manifest["qlora"]
    assert qlora["target"] == "4-bit base given" and qlora["settings"] is None  # nothing to rebuild
    assert qlora["evidence"] == [
        {"source": "user", "where": "--base", "detail": f"4-bit base given with --base: {q}", "four_bit": True}
    ]
