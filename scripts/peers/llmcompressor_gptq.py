"""llm-compressor's GPTQ on CPU: the peer of `mergeq export gptq` in scripts/bench_int4.py.

Runs inside the `llmcompressor` peer environment (tests/peer_env.py). Every document of CALIB_TXT (documents are
separated by blank lines) is one calibration sample, truncated to SEQ_LEN tokens.

Usage: python llmcompressor_gptq.py BASE_DIR CALIB_TXT OUT_DIR {sym,asym} GROUP_SIZE SEQ_LEN
Prints one JSON line: {"quantize_seconds", "samples", "tokens"}. OUT_DIR gets a compressed-tensors
pack-quantized checkpoint with the tokenizer.
"""

import json
import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    base, calib, out, symmetry, group_size, seq_len = sys.argv[1:7]
    group_size, seq_len = int(group_size), int(seq_len)
    tokenizer = AutoTokenizer.from_pretrained(base)
    with open(calib, encoding="utf-8") as handle:
        docs = [doc for doc in handle.read().split("\n\n") if doc.strip()]
    dataset = Dataset.from_dict({"text": docs}).map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=seq_len), remove_columns=["text"]
    )
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    scheme = {
        "targets": ["Linear"],
        "weights": {
            "num_bits": 4,
            "type": "int",
            "symmetric": symmetry == "sym",
            "strategy": "group",
            "group_size": group_size,
        },
    }
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=seq_len, num_calibration_samples=len(docs))
    seconds = time.perf_counter() - start
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    print(json.dumps({"quantize_seconds": round(seconds, 1), "samples": len(docs), "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
