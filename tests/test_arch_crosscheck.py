"""Our int4 checkpoints of every family (Llama, Mistral, Qwen2 and those of tests/test_arch_families.py), read by
code we did not write.

- compressed-tensors (gptq symmetric and awq asymmetric, pack-quantized): compressed-tensors' own unpacker
  (scripts/peers/unpack_ct.py) gives, for every packed module, MoE experts included, the same integer codes
  and zero points as our reader, bit for bit.
- native gptq / awq: transformers' GPTQ/AWQ integration with GPTQModel's kernels (scripts/peers/load_int4.py)
  dequantizes every quantized linear it builds to the same weights as our reader, bit for bit. For the dense
  families that is every linear; for the MoE families transformers builds quantized
  layers for the attention only (its fused experts take no GPTQ/AWQ tensors), so the experts are checked by
  the compressed-tensors case above.

The peer environment (`int4-loaders`) is built on first use and cached.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from int4_models import FAMILIES as LLAMA_LIKE
from int4_models import MORE_FAMILIES, calibration_text, options_for, tiny_model
from peer_env import ensure_live, run_measured
from safetensors.torch import load_file

from exporters.int4.export import export_int4
from exporters.int4.formats import dequantized_state_dict, read_quantized

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
UNPACK = ROOT / "scripts" / "peers" / "unpack_ct.py"
LOADER = ROOT / "scripts" / "peers" / "load_int4.py"
FAMILIES = list(LLAMA_LIKE) + list(MORE_FAMILIES)
MOE = {"mixtral", "qwen3_moe"}
TOKENS = [[5, 17, 99, 3, 250, 64, 128, 7, 42, 200, 11, 31], [255, 0, 13, 66, 101, 140, 33, 2, 90, 160, 47, 222]]
# case -> (method, format)
CASES = {
    "ct-gptq": ("gptq", "compressed-tensors"),
    "ct-awq": ("awq", "compressed-tensors"),
    "gptq": ("gptq", "native"),
    "awq": ("awq", "native"),
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, pytestconfig) -> dict:
    python = ensure_live(pytestconfig, "int4-loaders")
    work = tmp_path_factory.mktemp("arch-crosscheck")
    calib = calibration_text(work / "calib.txt")
    dirs = {}
    for family in FAMILIES:
        base = tiny_model(work / f"base-{family}", family)
        for case, (method, fmt) in CASES.items():
            out = work / f"{family}-{case}"
            export_int4(
                base,
                out,
                options_for(method, format=fmt, calib=calib, samples=4, seq_len=64, group_size=32, device="cpu"),
            )
            dirs[(family, case)] = out
    args = []
    for (family, case), out in dirs.items():
        if case.startswith("ct-"):
            args += [out, work / f"{family}-{case}.ints.safetensors"]
    run_measured([str(python), str(UNPACK), *map(str, args)], label="compressed-tensors unpack")
    tokens = work / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    native = [str(tokens)]
    for (family, case), out in dirs.items():
        if not case.startswith("ct-"):
            native += [str(out), str(work / f"{family}-{case}.peer.safetensors")]
    run = run_measured([str(python), str(LOADER), *native], label="int4-loaders", check=False)
    loaded = {
        Path(d["model"]).name: d for d in map(json.loads, (x for x in run.output.splitlines() if x.startswith("{")))
    }
    return {"dirs": dirs, "work": work, "loaded": loaded, "output": run.output}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["ct-gptq", "ct-awq"])
def test_compressed_tensors_unpacks_our_integers(artifacts, family, case):
    out = artifacts["dirs"][(family, case)]
    theirs = load_file(artifacts["work"] / f"{family}-{case}.ints.safetensors")
    ours, _ = read_quantized(out)
    codes = {k.removeprefix("codes:"): v for k, v in theirs.items() if k.startswith("codes:")}
    assert sorted(codes) == sorted(ours)
    if family in MOE:
        assert any(".experts." in name for name in codes)
    for name, q in ours.items():
        # compressed-tensors' codes and zero points are signed (offset 8); ours are unsigned
        assert torch.equal(codes[name].to(torch.int32) + 8, q.codes.to(torch.int32)), name
        if case == "ct-awq":
            assert torch.equal(theirs[f"zeros:{name}"].to(torch.int32) + 8, q.zeros.to(torch.int32)), name
        else:
            assert f"zeros:{name}" not in theirs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["gptq", "awq"])
def test_gptqmodel_dequantizes_our_linears_as_we_do(artifacts, family, case):
    out = artifacts["dirs"][(family, case)]
    info = artifacts["loaded"].get(out.name)
    assert info is not None and "error" not in info, f"{out.name}: {info}\n{artifacts['output'][-2000:]}"
    assert info["method"] == case and all(t.startswith("gptqmodel.") for t in info["layer_types"])
    peer = load_file(artifacts["work"] / f"{family}-{case}.peer.safetensors")
    weights = {k.removeprefix("weight:"): v for k, v in peer.items() if k.startswith("weight:")}
    state = {
        k: v.half().float() for k, v in dequantized_state_dict(out, torch.float32).items() if v.is_floating_point()
    }
    ours, _ = read_quantized(out)
    expected = {n for n in ours if ".experts." not in n}
    assert set(weights) == expected
    for name, weight in weights.items():
        assert torch.equal(weight, state[f"{name}.weight"]), name
    if family not in MOE:
        assert len(weights) == len(ours)
