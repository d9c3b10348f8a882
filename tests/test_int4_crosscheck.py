"""Our int4 checkpoints, read by implementations we did not write, give our own unpacking's weights and logits.

For each format `mergeq export gptq|awq` writes (gptq, awq gemm, compressed-tensors pack-quantized), on a
tiny random Llama built here:
- the peer loads the checkpoint (scripts/peers/load_int4.py, in the `int4-loaders` environment of
  tests/peer_env.py: transformers' GPTQ/AWQ integration with GPTQModel's torch kernels, and compressed-tensors'
  own decompressor), and returns every quantized layer's dequantized weight and the model's logits;
- mergeq's side is exporters.int4.formats.dequantized_state_dict loaded into a plain transformers model.
Both sides run in float32 over the weights as a float16 runtime holds them ((code - zero) * scale rounded
once to float16), so the dequantized weights must agree bit for bit and the logits to float32 noise.

A negative control packs one AWQ layer in plain nibble order instead of AWQ's interleave (the classic
writer bug) and checks that the comparison catches it.

The peer environment is built on first use (about 2 minutes, logged live) and cached under
cache_root()/peers.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from int4_models import calibration_text, tiny_model  # noqa: E402
from peer_env import ensure_live, run_measured  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LOADER = ROOT / "scripts" / "peers" / "load_int4.py"
TOKENS = [
    [5, 17, 99, 3, 250, 64, 128, 7, 42, 200, 11, 31, 77, 180, 9, 1],
    [255, 0, 13, 66, 101, 140, 33, 2, 90, 160, 47, 222, 8, 19, 230, 120],
]
EXPORT = ["--group-size", "64", "--samples", "8", "--seq-len", "64", "--no-eval"]

# artifact name -> (model family, exporter, extra options). Qwen2 has q/k/v biases.
CASES = {
    "gptq-sym": ("llama", "gptq", []),
    "gptq-asym": ("llama", "gptq", ["--asym"]),
    "gptq-desc-act": ("llama", "gptq", ["--desc-act"]),
    "awq": ("llama", "awq", []),
    "ct-gptq-sym": ("llama", "gptq", ["--format", "compressed-tensors"]),
    "ct-awq-asym": ("llama", "awq", ["--format", "compressed-tensors"]),
    "qwen2-awq": ("qwen2", "awq", []),
    "qwen2-ct-gptq-sym": ("qwen2", "gptq", ["--format", "compressed-tensors"]),
}
TAMPERED = "awq-plain-order"
QUANTIZED = sorted(
    f"model.layers.{i}.{proj}"
    for i in range(2)
    for proj in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
)


@pytest.fixture(scope="module")
def peer_python(pytestconfig) -> Path:
    """The int4-loaders environment; its first build is logged live on the terminal (not captured)."""
    return ensure_live(pytestconfig, "int4-loaders")


def _tamper_awq_order(src: Path, dst: Path) -> str:
    """Copy an AWQ checkpoint, re-packing one layer's qweight in plain nibble order (position k = column k)
    instead of AWQ's interleave (position k = column [0,2,4,6,1,3,5,7][k]). Returns the layer's name."""
    shutil.copytree(src, dst)
    shard = next(dst.glob("*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.1.mlp.down_proj"
    words = tensors[f"{name}.qweight"].to(torch.int64)
    nibbles = torch.stack([(words >> (4 * k)) & 0xF for k in range(8)], dim=-1)  # by position in the word
    columns = torch.empty_like(nibbles)
    columns[..., [0, 2, 4, 6, 1, 3, 5, 7]] = nibbles  # by output column
    plain = sum(columns[..., k] << (4 * k) for k in range(8))
    tensors[f"{name}.qweight"] = ((plain + 2**31) % 2**32 - 2**31).to(torch.int32)
    save_file(tensors, shard, metadata={"format": "pt"})
    return name


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, peer_python) -> dict:
    """Export every case with `mergeq export`, then read them all in one peer process."""
    from mergeq.cli import main

    work = tmp_path_factory.mktemp("int4-crosscheck")
    bases = {
        family: tiny_model(work / family, family, hidden=128, intermediate=256, layers=2)
        for family in sorted({family for family, _, _ in CASES.values()})
    }
    calib = calibration_text(work / "calib.txt")
    dirs = {}
    for name, (family, target, extra) in CASES.items():
        out = work / name
        code = main(
            ["export", target, "--model", str(bases[family]), "--out", str(out), "--calib", str(calib), *EXPORT, *extra]
        )
        assert code == 0, f"mergeq export {target} {' '.join(extra)} failed with exit code {code}"
        dirs[name] = out
    tampered_layer = _tamper_awq_order(dirs["awq"], work / TAMPERED)
    dirs[TAMPERED] = work / TAMPERED

    tokens = work / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    args = [tokens]
    for name, directory in dirs.items():
        args += [directory, work / f"{name}.peer.safetensors"]
    run = run_measured([str(peer_python), str(LOADER), *map(str, args)], label="int4-loaders", check=False)
    lines = (x for x in run.output.splitlines() if x.startswith("{"))
    loaded = {Path(d["model"]).name: d for d in map(json.loads, lines)}
    assert set(loaded) == set(dirs), f"the peer loader stopped early (exit {run.returncode}):\n{run.output[-3000:]}"
    peer = {name: load_file(work / f"{name}.peer.safetensors") for name in dirs if "error" not in loaded[name]}
    return {"dirs": dirs, "peer": peer, "loaded": loaded, "bases": bases, "tampered_layer": tampered_layer}


def our_side(model_dir: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """mergeq's own unpacking: the dequantized state dict, rounded to float16 as the checkpoint's dtype, in a
    plain float32 transformers model. Returns (float16-rounded state dict, logits)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from exporters.int4.formats import dequantized_state_dict

    state = {
        k: v.half().float() if v.is_floating_point() else v
        for k, v in dequantized_state_dict(model_dir, torch.float32).items()
    }
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, f"{model_dir}: tensors the model does not have: {unexpected}"
    assert not [m for m in missing if "rotary" not in m], f"{model_dir}: tensors missing: {missing}"
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(TOKENS)).logits.float()
    return state, logits


@pytest.mark.parametrize("case", list(CASES))
def test_peer_reads_our_checkpoint_as_we_do(artifacts, case):
    directory = artifacts["dirs"][case]
    error = artifacts["loaded"][case].get("error")
    assert error is None, f"{case}: the independent loader refused our checkpoint: {error}"
    peer = artifacts["peer"][case]
    state, logits = our_side(directory)

    peer_weights = {k.removeprefix("weight:"): v for k, v in peer.items() if k.startswith("weight:")}
    assert sorted(peer_weights) == QUANTIZED, f"{case}: the peer found other quantized layers than we wrote"
    for name, weight in peer_weights.items():
        torch.testing.assert_close(
            weight, state[f"{name}.weight"], rtol=0, atol=0, msg=lambda m, n=name: f"{case} {n}: {m}"
        )
    # the weights really are quantized (not the fp16 originals passed through)
    base = load_file(next(artifacts["bases"][CASES[case][0]].glob("*.safetensors")))
    w = state["model.layers.0.mlp.down_proj.weight"]
    assert not torch.allclose(w, base["model.layers.0.mlp.down_proj.weight"].float(), atol=1e-4)

    torch.testing.assert_close(peer["logits"], logits, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} logits: {m}")
    assert artifacts["loaded"][case]["layers"] == len(QUANTIZED)


def test_peer_kernels_are_not_ours(artifacts):
    """The layers the peer ran are its own classes: GPTQModel's for gptq/awq, a dense Linear after
    compressed-tensors decompressed it."""
    for case in CASES:
        info = artifacts["loaded"][case]
        if "error" in info:
            continue  # reported by test_peer_reads_our_checkpoint_as_we_do
        kinds = " ".join(info["layer_types"])
        family, target, extra = CASES[case]
        if "compressed-tensors" in extra:
            assert info["method"] == "compressed-tensors" and kinds == "torch.nn.modules.linear.Linear"
        else:
            assert info["method"] == target and kinds.startswith("gptqmodel."), kinds
        assert "mergeq" not in kinds and "exporters" not in kinds


def test_crosscheck_catches_a_wrong_nibble_order(artifacts):
    """Negative control: one AWQ layer packed in plain order must disagree with our unpacking of the
    correctly packed checkpoint, while every other layer still agrees."""
    state, _ = our_side(artifacts["dirs"]["awq"])
    peer = artifacts["peer"][TAMPERED]
    bad = artifacts["tampered_layer"]
    assert not torch.allclose(peer[f"weight:{bad}"], state[f"{bad}.weight"], rtol=1e-2, atol=1e-3)
    good = "model.layers.0.mlp.down_proj"
    torch.testing.assert_close(peer[f"weight:{good}"], state[f"{good}.weight"], rtol=0, atol=0)
    assert not torch.allclose(peer["logits"], artifacts["peer"]["awq"]["logits"], rtol=1e-2, atol=1e-3)
