"""Serve one model directory with vLLM (`vllm.LLM`) and report what it did; runs in the `vllm` peer environment.

Usage: python vllm_serve.py REQUEST_JSON OUT_JSON

REQUEST_JSON: {"model": DIR, "quantization": null or a --quantization value, "dtype": "float16",
               "windows": [[token ids], ...], "first_scored": P, "question": "...", "chat_tokens": 24,
               "reference_wna16": false}
The windows are mergeq's evaluation windows (BOS already in place). In each window the token at position p
(p > P) is scored by its log-probability given the tokens before it: the positions mergeq scores (logits at
P .. n_ctx-2 predicting the tokens at P+1 .. n_ctx-1). vLLM returns these with SamplingParams(prompt_logprobs=0):
for every prompt position after the first, the log-probability of the token actually there.

OUT_JSON: {"nll": [per-window sums], "count": scored tokens, "answer": the chat reply to `question`,
           "kernels": {module class -> count}, "linear_methods": {...}, "vllm": version, "seconds": {...},
           "int4_gemm": "vllm" or "reference", "reference_check": {...} or null}

vLLM's CPU int4 GEMM (torch.ops._C.cpu_gemm_wna16) exists only in its AVX-512 (and RISC-V, s390x) builds. Where
it is missing, this script stops with exit code 3 and says so, unless the request sets "reference_wna16": then
vLLM runs with wna16_reference.cpu_gemm_wna16 in the op's place ("int4_gemm": "reference"). Where the op exists,
vLLM's own op runs, and with "reference_wna16" set the reference is also compared with it on every quantized
layer vLLM built ("reference_check": the largest difference relative to the largest output).

One model per process: a second LLM in one process is not reliable on the CPU build.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the default takes far more than a 135M model needs
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model lives in this process: apply_model sees it

import torch  # noqa: E402
import vllm  # noqa: E402
import vllm._custom_ops as vllm_ops  # noqa: E402
import wna16_reference  # noqa: E402  (beside this script)
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

NO_OP_EXIT = 3


def has_int4_gemm() -> bool:
    """Whether this vLLM build registered its CPU int4 GEMM (after loading its kernels for this CPU)."""
    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def layer_kernels(model) -> dict:
    """Per quantized linear module: the vLLM linear method and, where it delegates to one, the kernel class."""
    found = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None or type(method).__name__ == "UnquantizedLinearMethod":
            continue
        kernel = getattr(method, "kernel", None)
        found[name] = {"method": type(method).__name__, "kernel": type(kernel).__name__ if kernel is not None else None}
    return found


def reference_check(model) -> dict:
    """vLLM's own op against the reference, on every layer CPUWNA16 runs, for one fixed random input each."""
    generator = torch.Generator().manual_seed(0)
    worst, layers = 0.0, 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "kernel", None)
        if type(kernel).__name__ != "CPUWNA16LinearKernel" or getattr(module, "use_w4a8", False):
            continue
        w_q, w_s, w_zp = kernel._get_weight_params(module)
        x = torch.randn(5, w_q.shape[1] // 2, generator=generator).to(w_s.dtype)
        args = (x, w_q, w_s, w_zp, None, 8, module.isa_hint)
        theirs, ours = vllm_ops.cpu_gemm_wna16(*args).float(), wna16_reference.cpu_gemm_wna16(*args).float()
        worst = max(worst, ((theirs - ours).abs().max() / theirs.abs().max()).item())
        layers += 1
    return {"layers": layers, "max_relative_difference": worst}


def main() -> None:
    request_path, out_path = sys.argv[1:3]
    with open(request_path) as handle:
        request = json.load(handle)
    windows, first = request["windows"], request["first_scored"]
    n_ctx = len(windows[0])
    seconds = {}
    allow_reference = bool(request.get("reference_wna16"))
    native = has_int4_gemm()
    if not native and not allow_reference:
        print(
            f"vLLM {vllm.__version__} on this CPU has no int4 GEMM: torch.ops._C.cpu_gemm_wna16 is compiled only "
            "into vLLM's AVX-512, RISC-V and s390x builds (vllm-project/vllm#55613), so AWQ/GPTQ layers fail at "
            "their first forward. Serve int4 on a GPU or an AVX-512 CPU, or check the checkpoint with "
            "vllm_check.py --reference-wna16 (vLLM loads it, mergeq's torch reference does the GEMM).",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(NO_OP_EXIT)
    if not native:
        vllm_ops.cpu_gemm_wna16 = wna16_reference.cpu_gemm_wna16  # looked up at call time by CPUWNA16LinearKernel

    start = time.monotonic()
    llm = LLM(
        model=request["model"],
        quantization=request.get("quantization"),
        dtype=request.get("dtype", "float16"),
        max_model_len=n_ctx + 32,
        enforce_eager=True,
        seed=0,
    )
    seconds["load"] = time.monotonic() - start
    layers = llm.apply_model(layer_kernels)[0]
    checked = llm.apply_model(reference_check)[0] if native and allow_reference else None

    start = time.monotonic()
    prompts = [TokensPrompt(prompt_token_ids=list(w)) for w in windows]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
    nll, count = [], 0
    for window, out in zip(windows, outs):
        total = 0.0
        for pos in range(first + 1, n_ctx):
            total -= out.prompt_logprobs[pos][window[pos]].logprob
            count += 1
        nll.append(total)
    seconds["score"] = time.monotonic() - start

    start = time.monotonic()
    reply = llm.chat(
        [{"role": "user", "content": request["question"]}],
        SamplingParams(max_tokens=request["chat_tokens"], temperature=0),
        use_tqdm=False,
    )
    seconds["chat"] = time.monotonic() - start

    kernels: dict[str, int] = {}
    methods: dict[str, int] = {}
    for info in layers.values():
        key = info["kernel"] or info["method"]
        kernels[key] = kernels.get(key, 0) + 1
        methods[info["method"]] = methods.get(info["method"], 0) + 1
    result = {
        "model": request["model"],
        "quantization": request.get("quantization"),
        "nll": nll,
        "count": count,
        "answer": reply[0].outputs[0].text,
        "kernels": kernels,
        "linear_methods": methods,
        "quantized_modules": len(layers),
        "vllm": vllm.__version__,
        "int4_gemm": "vllm" if native else "reference",
        "reference_check": checked,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    with open(out_path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "nll"}), flush=True)


if __name__ == "__main__":
    main()
