"""Write a tiny llama-architecture GGUF for the llama.cpp smoke test: `python tiny.py OUT.gguf`.

Run as a script under the pinned gguf-py (exporters.llamacpp.smoke.smoke_test does that), never imported by mergeq:
it must write the file with the same gguf-py that the pinned tools read.

The model is one decoder layer, hidden 64, 4 heads, feed-forward 128, with a byte-level SentencePiece-style
vocabulary (<unk>, <s>, </s> and the 256 byte tokens), random weights from a fixed seed, matrices in F16.
Every matrix has rows of 64 and a multiple of 32 of them, so after `llama-quantize ... Q8_0` the matrix
products take the CPU's fastest kernels, AMX tiles included where the build has them: the code that
died by SIGILL on AMX machines is exercised in a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HIDDEN, HEADS, FFN, LAYERS, CONTEXT = 64, 4, 128, 1, 128
SPECIAL = ("<unk>", "<s>", "</s>")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_BYTE = 1, 3, 6  # llama.cpp's token types (gguf.TokenType)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = [*SPECIAL, *(f"<0x{b:02X}>" for b in range(256))]
    types = [TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    return tokens, [0.0] * len(tokens), types


def write(path: str) -> None:
    # this file's folder (first on sys.path when run as a script) holds mergeq modules with plain names
    # (build, run, source, ...): leave it out, so that `gguf` and what it imports come from the pinned gguf-py
    # that PYTHONPATH names and from the installed packages
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import gguf

    rng = np.random.default_rng(0)
    tokens, scores, types = vocabulary()
    vocab = len(tokens)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float16)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_file_type(1)  # mostly F16
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    writer.add_tensor("token_embd.weight", matrix(vocab, HIDDEN))
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{block}.{name}.weight", matrix(HIDDEN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", matrix(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_up.weight", matrix(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_down.weight", matrix(HIDDEN, FFN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.add_tensor("output.weight", matrix(vocab, HIDDEN))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tiny.py OUT.gguf")
    write(sys.argv[1])
