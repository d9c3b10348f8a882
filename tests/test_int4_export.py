"""The int4 exporters end to end on tiny random Llama / Mistral / Qwen2 models: formats read back,
streaming equals whole-model quantization, memory stays flat with depth, bytes are deterministic, and
preflight names the layers it rejects."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from family_models import LINEAR_TARGETS
from int4_models import calibration_text, int4_options, tiny_model

from exporters.int4 import kernels
from exporters.int4.calibration import load_calibration
from exporters.int4.export import export_int4, plan
from exporters.int4.families import family_of
from exporters.int4.formats import dequantized_state_dict, read_quantized
from exporters.int4.layer import EngineOptions, LayerContext
from exporters.int4.options import AwqOptions, GptqOptions
from exporters.int4.passes import quantize_layer
from exporters.int4.quant import QuantScheme
from mergeq.core.errors import MergeqError
from mergeq.core.skeleton import LayerCall

REPO = Path(__file__).resolve().parents[1]


def _options(method, calib, **kw):
    base = dict(calib=calib, samples=8, seq_len=64, group_size=32, device="cpu")
    base.update(kw)
    return int4_options(method, **base)


def _loss(model_dir_or_state, base_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if isinstance(model_dir_or_state, dict):
        result = model.load_state_dict(model_dir_or_state, strict=False)
        assert not result.unexpected_keys and not result.missing_keys, result
    with torch.inference_mode():
        return float(model(tokens, labels=tokens).loss)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_export_reads_back_for_every_family(tmp_path, family, method):
    base = tiny_model(tmp_path / "base", family)
    calib = calibration_text(tmp_path / "calib.txt")
    report = export_int4(base, tmp_path / "out", _options(method, calib))
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == method and qc["bits"] == 4 and qc["group_size"] == 32
    assert config["dtype"] == "float16"
    if method == "awq":
        assert qc["version"] == "gemm" and qc["zero_point"] is True and report.extra["sym"] is False
    else:
        assert qc["sym"] is True and qc["desc_act"] is False and qc["checkpoint_format"] == "gptq"
    assert (out / "tokenizer.json").is_file()
    linears, plain = read_quantized(out)
    targets = LINEAR_TARGETS[family]
    assert len(linears) == config["num_hidden_layers"] * len(targets)
    assert {name.rsplit(".", 1)[1] for name in linears} == set(targets)
    assert all(not name.endswith("proj.weight") for name in plain)  # no float copy of a quantized weight
    assert "lm_head.weight" in plain and "model.embed_tokens.weight" in plain
    if family == "qwen2":
        assert linears["model.layers.0.self_attn.q_proj"].bias is not None
    state = dequantized_state_dict(out)
    tokens = load_calibration(calib, __import__("transformers").AutoTokenizer.from_pretrained(base), 4, 64).tokens
    fp_loss = _loss(None, base, tokens)
    q_loss = _loss(state, base, tokens)
    assert abs(q_loss - fp_loss) < 0.05 * fp_loss
    assert report.size.bits_per_quantized_weight < 5.5
    assert report.extra["calib_sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
    assert report.extra["calib_samples"] == 8 and report.extra["calib_seq_len"] == 64
    assert set(report.extra["vllm_kernel_by_tp"]) == {"1", "2", "4", "8"}


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_export_matches_native(tmp_path, sym):
    base = tiny_model(tmp_path / "base", hidden=128, intermediate=256)  # Marlin-sized: asymmetric needs it
    calib = calibration_text(tmp_path / "calib.txt")
    export_int4(base, tmp_path / "native", _options("gptq", calib, sym=sym))
    export_int4(base, tmp_path / "ct", _options("gptq", calib, sym=sym, format="compressed-tensors"))
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is sym
    native = dequantized_state_dict(tmp_path / "native")
    ct = dequantized_state_dict(tmp_path / "ct")
    assert native.keys() == ct.keys()
    for name in native:
        if name.endswith("proj.weight") and not sym:
            continue  # GPTQ v1 cannot hold a zero point of 0, so the asymmetric grids differ slightly
        assert torch.equal(native[name].float(), ct[name].float()), name


def test_streaming_matches_whole_model_quantization(tmp_path):
    """The streamed export equals quantizing the layers of a fully loaded transformers model, whose own
    forward (embeddings, rotary, masks) produces each layer's input and arguments."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_model(tmp_path / "base", "llama", layers=3)
    calib = calibration_text(tmp_path / "calib.txt")
    export_int4(base, tmp_path / "out", _options("gptq", calib, samples=6, seq_len=48))
    streamed, _ = read_quantized(tmp_path / "out")

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    tokens = load_calibration(calib, AutoTokenizer.from_pretrained(base), 6, 48).tokens
    family = family_of(json.loads((base / "config.json").read_text()))
    options = EngineOptions(given=GptqOptions(device="cpu"), scheme=QuantScheme(4, 32, True))

    class Captured(Exception):
        pass

    for index, layer in enumerate(model.model.layers):
        captured = {}

        def hook(_module, args, kwargs, captured=captured):
            if args:
                captured["x"], captured["call"] = args[0], LayerCall(tuple(args[1:]), dict(kwargs))
            else:
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                captured["x"], captured["call"] = kwargs["hidden_states"], LayerCall((), rest, True)
            raise Captured

        handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
        with pytest.raises(Captured), torch.inference_mode():
            model.model(tokens, use_cache=False)
        handle.remove()
        ctx = LayerContext(family=family, options=options, layer_index=index, calls=[captured["call"]])
        _, quantized, _ = quantize_layer(layer, [captured["x"].clone()], ctx)
        for name, q in quantized.items():
            mine = streamed[f"model.layers.{index}.{name}"]
            agree = (mine.codes.long() == q.codes.long()).float().mean().item()
            assert agree > 0.995, (index, name, agree)
            assert torch.allclose(mine.dequantize(), q.dequantize(), atol=1e-2)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_export_is_byte_identical_across_runs(tmp_path, method):
    base = tiny_model(tmp_path / "base", "qwen2")
    calib = calibration_text(tmp_path / "calib.txt")
    for run in ("a", "b"):
        export_int4(base, tmp_path / run, _options(method, calib))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_preflight_names_the_layers_and_suggests_a_group_size(tmp_path):
    base = tiny_model(tmp_path / "base", hidden=96, intermediate=192, heads=4, kv_heads=2, tokenizer=False)
    with pytest.raises(MergeqError) as err:
        plan(base, GptqOptions(group_size=64))
    text = str(err.value)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj"):
        assert name in text
    assert "mlp.down_proj" not in text.split("hint")[0]  # 192 is divisible by 64
    assert "--group-size 32" in text
    chosen = plan(base, GptqOptions())
    assert chosen.scheme.group_size == 32 and "128 does not divide" in chosen.choices[0]


def test_preflight_refuses_what_vllm_cannot_load(tmp_path):
    demo_like = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "num_hidden_layers": 30,
    }
    sym = kernels.predict_kernels(demo_like, "gptq", QuantScheme(4, 64, True), False)
    assert sym["method"] == "auto_gptq"  # vLLM 0.32; tests/test_int4_kernels_vllm.py checks these against vLLM
    # Marlin pads misaligned tiles since vLLM 0.2x; Machete (SM 9.0) needs out % 128, which only gate_up has
    assert sym["tp"]["1"]["kernels"] == {
        "qkv_proj": "marlin",
        "o_proj": "marlin",
        "gate_up_proj": "machete",
        "down_proj": "marlin",
    }
    assert sym["tp"]["1"]["by_gpu"]["sm80"] == dict.fromkeys(sym["tp"]["1"]["kernels"], "marlin")
    assert not sym["tp"]["2"]["ok"] and "9 attention heads" in sym["tp"]["2"]["problems"][0]
    asym = kernels.predict_kernels(demo_like, "gptq", QuantScheme(4, 64, False), False)
    assert not asym["tp"]["1"]["ok"] and "only symmetric" in asym["refused"]
    awq = kernels.predict_kernels(demo_like, "awq", QuantScheme(4, 64, False), False)
    assert awq["method"] == "auto_awq" and awq["tp"]["1"]["kernels"]["qkv_proj"] == "marlin"
    ct_asym = kernels.predict_kernels(demo_like, "compressed-tensors", QuantScheme(4, 64, False), False)
    assert ct_asym["tp"]["1"]["ok"]  # asymmetric WNA16 runs on Machete/Marlin in vLLM 0.32
    big = dict(
        demo_like,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    )
    fast = kernels.predict_kernels(big, "gptq", QuantScheme(4, 128, True), False)
    assert all(
        entry["kernels"] == dict.fromkeys(entry["kernels"], "machete") and entry["ok"] for entry in fast["tp"].values()
    )
    assert kernels.summarize(fast)["8"] == "auto_gptq: sm90 machete x4; sm80 sm75 marlin x4"
    assert kernels.predict_kernels(big, "gptq", QuantScheme(4, 128, True), True)["refused"]  # desc_act

    base = tiny_model(tmp_path / "base", hidden=64, intermediate=192, tokenizer=False)
    with pytest.raises(MergeqError, match="vLLM would refuse"):  # group 16: no vLLM kernel takes asymmetric codes
        plan(base, GptqOptions(group_size=16, sym=False, format="compressed-tensors"))
    with pytest.raises(MergeqError, match="desc-act"):
        plan(base, AwqOptions(desc_act=True))
    with pytest.raises(MergeqError, match="compressed-tensors") as refused:  # it dropped actorder "group"
        plan(base, GptqOptions(desc_act=True, format="compressed-tensors"))
    assert "--format native" in str(refused.value)


def test_calibration_errors_and_warnings(tmp_path):
    base = tiny_model(tmp_path / "base")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(MergeqError, match="has no text"):
        export_int4(base, tmp_path / "o1", _options("gptq", empty))
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(MergeqError, match="fewer than one sample"):
        export_int4(base, tmp_path / "o2", _options("gptq", short))
    assert not (tmp_path / "o2").exists()  # nothing partial
    records = tmp_path / "calib.jsonl"
    records.write_text("\n".join(json.dumps({"text": "alpha beta gamma " * 20}) for _ in range(5)) + "\n")
    report = export_int4(base, tmp_path / "o3", _options("awq", records, samples=64, seq_len=64))
    assert report.extra["calib_samples"] < 64
    assert any("instead of the 64 asked for" in w for w in report.warnings)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no text field"}\n')
    with pytest.raises(MergeqError, match="bad.jsonl:2"):
        export_int4(base, tmp_path / "o4", _options("gptq", bad))


def test_cli_export_writes_artifact_and_refuses_foreign_output(tmp_path):
    from mergeq.cli import main

    base = tiny_model(tmp_path / "base")
    calib = calibration_text(tmp_path / "calib.txt")
    out = tmp_path / "gptq"
    argv = [
        "export",
        "gptq",
        "--model",
        str(base),
        "--out",
        str(out),
        "--no-eval",
        "--calib",
        str(calib),
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--group-size",
        "32",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "gptq" and report["quant"] == "w4g32-sym"
    assert report["extra"]["vllm_kernel_by_tp"]["1"].startswith("auto_gptq")
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(argv[:5] + [str(foreign)] + argv[6:]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_tensors_outside_the_layers_are_copied_a_piece_at_a_time(tmp_path, monkeypatch):
    """The embedding and lm_head (1 GiB each at Llama-3.1-8B's vocabulary) are never read whole: the capture
    gathers the calibration tokens' rows block by block and the copy-through streams pieces to the writer
    (before, reading one whole held it twice, mapped pages and copy: GPTQ's 2.3 GiB before its first layer).
    The bytes equal `ShardWriter.add` of the whole tensors, bf16 converted to fp16 as before."""
    from safetensors.torch import load_file

    from exporters.int4.checkpoint import TensorSource

    base = tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    calib = calibration_text(tmp_path / "calib.txt")
    whole: list[str] = []
    original = TensorSource.get

    def get(self, name):
        whole.append(name)
        return original(self, name)

    monkeypatch.setattr(TensorSource, "get", get)
    export_int4(base, tmp_path / "out", _options("gptq", calib, samples=4, seq_len=32))
    assert whole and not [n for n in whole if not n.startswith("model.layers.")], whole
    written = load_file(tmp_path / "out" / "model.safetensors")
    stored = load_file(base / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert written[name].dtype == torch.float16
        assert torch.equal(written[name], stored[name].to(torch.float16)), name


def test_shard_writer_pieces_write_the_bytes_of_the_whole_tensor(tmp_path):
    from mergeq.core.shards import ShardWriter

    tensors = {f"t{i}": torch.randn(37, 11 + i).to(torch.float16) for i in range(5)}
    for mode in ("whole", "parts"):
        (tmp_path / mode).mkdir()
        writer = ShardWriter(tmp_path / mode, max_shard_bytes=2500)
        for name, tensor in tensors.items():
            if mode == "whole":
                writer.add(name, tensor)
            else:
                writer.add_parts(name, tensor.dtype, tuple(tensor.shape), tensor.reshape(-1).split(100))
        writer.finish()
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert len(files) > 2 and files == sorted(p.name for p in (tmp_path / "parts").iterdir())
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "parts" / name).read_bytes(), name
    short = ShardWriter(tmp_path / "whole", max_shard_bytes=2500)
    with pytest.raises(RuntimeError, match="bytes for t0"):
        short.add_parts("t0", torch.float16, (37, 11), [tensors["t0"].reshape(-1)[:10]])


def test_cli_export_report_records_each_steps_peak_memory(tmp_path):
    """`mergeq export` (outside `mergeq run`) records every step's peak resident memory in report.json, as the
    pipeline's stages do: above what torch alone holds, below the machine's (or the cgroup's) memory."""
    from mergeq.cli import main
    from mergeq.core.memory import memory_limit_bytes

    base = tiny_model(tmp_path / "base")
    calib = calibration_text(tmp_path / "calib.txt")
    text = calibration_text(tmp_path / "eval.txt", chars=6000, seed=1)
    out = tmp_path / "awq"
    argv = ["export", "awq", "--model", str(base), "--out", str(out), "--eval-text", str(text), "--calib", str(calib)]
    assert main(argv + ["--samples", "4", "--seq-len", "32", "--group-size", "32", "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ceiling = min(total, memory_limit_bytes() or total)
    assert set(report["peak_rss_bytes"]) == {"quantize", "eval"} == set(report["seconds"])
    for step, peak in report["peak_rss_bytes"].items():
        assert 64 * 2**20 < peak < ceiling, (step, peak)
