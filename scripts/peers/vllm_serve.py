"""Serve one model directory with vLLM (`vllm.LLM`) and report what it did; runs in the `vllm` peer environment.

Usage: python vllm_serve.py REQUEST_JSON OUT_JSON

REQUEST_JSON: {"model": DIR, "quantization": null or a --quantization value, "dtype": "float16",
               "windows": [[token ids], ...], "first_scored": P, "question": "..."}
The windows are mergeq's evaluation windows (BOS already in place). In each window the token at position p
(p > P) is scored by its log-probability given the tokens before it: the positions mergeq scores (logits at
P .. n_ctx-2 predicting the tokens at P+1 .. n_ctx-1). vLLM returns these with SamplingParams(prompt_logprobs=0):
for every prompt position after the first, the log-probability of the token actually there.

OUT_JSON: {"nll": [per-window sums], "count": scored tokens, "answer": the chat reply to `question`,
           "kernels": {module class -> count}, "linear_methods": {...}, "vllm": version, "seconds": {...}}

One model per process: a second LLM in one process is not reliable on the CPU build.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the default takes far more than a 135M model needs
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model lives in this process: apply_model sees it

import vllm  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402


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


def main() -> None:
    request_path, out_path = sys.argv[1:3]
    with open(request_path) as handle:
        request = json.load(handle)
    windows, first = request["windows"], request["first_scored"]
    n_ctx = len(windows[0])
    seconds = {}

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
        [{"role": "user", "content": request["question"]}], SamplingParams(max_tokens=24, temperature=0), use_tqdm=False
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
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    with open(out_path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "nll"}), flush=True)


if __name__ == "__main__":
    main()
