"""A tiny export matrix built in seconds: one tiny Llama (SentencePiece tokenizer, chat template), N LoRA adapters
for it, texts, and a `[[model]]` config exporting GGUF Q8_0 and AWQ (shared by the matrix tests and scripts)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parent
for extra in (str(TESTS), str(TESTS / "hostile")):
    if extra not in sys.path:
        sys.path.insert(0, extra)

from make_corpus import HIDDEN, add_fast_tokenizer  # noqa: E402
from test_gguf_export import CORPUS  # noqa: E402
from test_gguf_export import tiny_llama as spm_llama  # noqa: E402
from tiny_models import make_adapter  # noqa: E402


def build_matrix(root: Path, adapters: int = 3, *, evaluate: bool = False) -> Path:
    """Write the models, texts and `matrix.toml` under `root`; return the config's path. Without `evaluate` the
    config turns evaluation off (the artifacts, not their scores, are what the matrix tests compare)."""
    root.mkdir(parents=True, exist_ok=True)
    base = spm_llama(root / "base", HIDDEN)
    add_fast_tokenizer(base)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for number in range(1, adapters + 1):
            adapter = make_adapter(
                base, root / f"adapter{number}", seed=number, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
            )
            rows.append(f'[[model]]\nname = "task{number}"\nadapters = [{{path = "{adapter}"}}]\n')
    (root / "calib.txt").write_text(CORPUS)
    (root / "eval.txt").write_text(CORPUS * 2)
    config = root / "matrix.toml"
    config.write_text(f"""[merge]
base = "{base}"
validate = false

{chr(10).join(rows)}
[eval]
{f'text = "{root / "eval.txt"}"' if evaluate else "enabled = false"}

[gguf]
quant = ["Q8_0"]

[awq]
group_size = 32
calib = "{root / "calib.txt"}"
samples = 4
seq_len = 32
""")
    return config
