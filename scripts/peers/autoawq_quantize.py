"""autoawq 0.2.9's AWQ (GEMM, zero point) on CPU: the peer of `mergeq export awq` in scripts/bench_int4.py.

Runs inside the `autoawq` peer environment (tests/peer_env.py). autoawq is deprecated: on torch 2.13 with
transformers 5 it runs, but its output has been measured broken here (perplexity in the millions), so the
benchmark evaluates whatever it writes instead of trusting it.

Usage: python autoawq_quantize.py BASE_DIR CALIB_TXT OUT_DIR GROUP_SIZE SEQ_LEN
CALIB_TXT: documents separated by blank lines, each one calibration text (autoawq cuts them into SEQ_LEN blocks).
Prints one JSON line: {"quantize_seconds", "samples"}.
"""

import json
import sys
import time

from awq import AutoAWQForCausalLM
from transformers import AutoTokenizer


def main() -> None:
    base, calib, out, group_size, seq_len = sys.argv[1:6]
    with open(calib, encoding="utf-8") as handle:
        docs = [doc for doc in handle.read().split("\n\n") if doc.strip()]
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoAWQForCausalLM.from_pretrained(base, device_map="cpu")
    config = {"zero_point": True, "q_group_size": int(group_size), "w_bit": 4, "version": "GEMM"}
    start = time.perf_counter()
    model.quantize(
        tokenizer, quant_config=config, calib_data=docs, max_calib_seq_len=int(seq_len), n_parallel_calib_samples=8
    )
    seconds = time.perf_counter() - start
    model.save_quantized(out)
    tokenizer.save_pretrained(out)
    print(json.dumps({"quantize_seconds": round(seconds, 1), "samples": len(docs)}), flush=True)


if __name__ == "__main__":
    main()
