"""Load an int4 checkpoint with implementations mergeq did not write; save its logits and weights.

Runs inside the `int4-loaders` peer environment (tests/peer_env.py), never in mergeq's own:
  - quant_method gptq / awq: transformers' own GPTQ/AWQ integration, which builds GPTQModel's torch
    quantized linear layers (GPTQModel 7.7, the kernel it picks for this CPU: with AVX512-BF16 or without,
    they differ); their weights are GPTQModel's own dequantization.
  - quant_method compressed-tensors: transformers' compressed-tensors integration with dequantize=True,
    so compressed-tensors' own decompressor (0.20) unpacks every layer into a dense weight.

Usage: python load_int4.py TOKENS_JSON MODEL_DIR OUT.safetensors [MODEL_DIR OUT.safetensors ...]
The model runs in float32 (packed codes and fp16 scales are exact in it). For each model, writes `logits`
(float32, [batch, seq, vocab]) and `weight:<module>` (float32, [out, in]) for every quantized linear layer,
and prints one JSON line describing what was loaded (or the error, and goes on with the next). Several models
share one process: imports are slow.
"""

import json
import os
import sys
import traceback

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # GPTQModel compiles its dequant with inductor: slow on CPU

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def load(model_dir: str):
    with open(os.path.join(model_dir, "config.json")) as handle:
        method = json.load(handle)["quantization_config"]["quant_method"]
    kwargs = {"dtype": torch.float32, "device_map": "cpu"}
    if method == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return method, AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def packed_modules(model_dir: str) -> set[str]:
    """Modules stored as compressed-tensors packed weights in the checkpoint itself."""
    names = set()
    for file in sorted(os.listdir(model_dir)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, file), "pt") as handle:
                names.update(k[: -len(".weight_packed")] for k in handle.keys() if k.endswith(".weight_packed"))
    return names


def gptqmodel_weight(name: str, module) -> torch.Tensor | None:
    """A GPTQModel quantized layer's weight, [out, in], by GPTQModel's own dequantization; None for other modules."""
    if not hasattr(module, "qweight"):
        return None
    if hasattr(module, "dequantize_weight"):  # [in, out]
        return module.dequantize_weight().T
    if not hasattr(module, "awq_weight_dequantize"):
        return None
    # the AWQ kernel GPTQModel picks on a CPU without AVX512-BF16 (TorchAtenAwqLinear) has no dequantize_weight; its
    # own dequantization reads the checkpoint's packing as long as the layer has not been repacked for int4pack
    # matmuls, which only a 16-bit forward pass does (this model runs in fp32)
    if getattr(module, "_cpu_transformed", False):
        raise RuntimeError(f"{name}: {type(module).__name__} was repacked before its weight could be read")
    return module.awq_weight_dequantize("cpu", torch.float32).T


def quantized_weights(method: str, model, model_dir: str) -> dict[str, torch.Tensor]:
    weights = {}
    packed = packed_modules(model_dir) if method == "compressed-tensors" else set()
    for name, module in model.named_modules():
        weight = gptqmodel_weight(name, module)
        if weight is None and name in packed:  # decompressed into a dense nn.Linear by compressed-tensors
            weight = module.weight.detach()
        if weight is not None:
            weights[name] = weight.float().contiguous()
    return weights


def run_one(model_dir: str, ids: torch.Tensor, out: str) -> None:
    method, model = load(model_dir)
    model.eval()
    weights = quantized_weights(method, model, model_dir)
    if not weights:
        raise RuntimeError(f"no quantized layer found in {model_dir}: the loader did not recognise the checkpoint")
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    tensors = {"logits": logits.contiguous(), **{f"weight:{k}": v for k, v in weights.items()}}
    save_file(tensors, out)
    kinds = sorted({type(m).__module__ + "." + type(m).__name__ for n, m in model.named_modules() if n in weights})
    print(json.dumps({"model": model_dir, "method": method, "layers": len(weights), "layer_types": kinds}), flush=True)


def main() -> None:
    tokens_json, pairs = sys.argv[1], sys.argv[2:]
    if not pairs or len(pairs) % 2:
        sys.exit(__doc__)
    with open(tokens_json) as handle:
        ids = torch.tensor(json.load(handle), dtype=torch.long)
    failed = 0
    for model_dir, out in zip(pairs[::2], pairs[1::2]):
        try:
            run_one(model_dir, ids, out)
        except Exception as exc:  # report it and go on with the next model
            failed += 1
            traceback.print_exc()
            print(json.dumps({"model": model_dir, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
