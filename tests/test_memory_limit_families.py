"""Streamed evaluation of a family other than the Llama-like three, under a hard memory limit (a cgroup; over it the
kernel kills the process): a synthetic Gemma 3 text model (q/k norms, sandwich norms, sliding and global layers,
tied embeddings) whose fp16 size is twice the limit goes through `mergeq eval`. The whole model in fp32, as the
evaluation loaded it before the stream took every family, is four times the limit.

Skipped, with the reason, only where no memory cgroup can be made (see tests/memory_limit.py)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from int4_models import calibration_text
from memory_limit import run_limited, unavailable
from synthetic import Gemma3Shape, write_llama
from tiny_models import sentencepiece_tokenizer

MiB = 1 << 20
LIMIT = 768 * MiB
# 21.3 MiB of fp16 per decoder layer; 74 layers: 1.54 GiB, 2.05x the limit
SHAPE = Gemma3Shape(hidden=1024, intermediate=2816, layers=74, heads=8, kv_heads=2, vocab=320)


def test_gemma3_evaluation_fits_in_half_the_model(tmp_path):
    why = unavailable()
    if why is not None:
        pytest.skip(why)
    base = write_llama(tmp_path / "gemma3", SHAPE, max_shard_bytes=512 * MiB)
    sentencepiece_tokenizer(base, vocab=SHAPE.vocab)
    text = calibration_text(tmp_path / "eval.txt", chars=1200, seed=1)
    assert sum(p.stat().st_size for p in base.glob("*.safetensors")) >= 2 * LIMIT
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MERGEQ_QUIET": "1", "MERGEQ_CACHE": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "mergeq.cli", "-q", "eval", "--model", str(base), "--text", str(text)]
    run = run_limited([*argv, "--n-ctx", "64", "--windows", "2", "--json"], LIMIT, env=env, timeout=600)
    what = f"mergeq eval of a {SHAPE.layers}-layer Gemma 3"
    assert not run.oom_killed, f"{what} was OOM-killed under {LIMIT // MiB} MiB after {run.seconds:.0f} s"
    assert run.returncode == 0, f"{what} failed (exit {run.returncode}):\n{run.stderr[-3000:]}"
    (report,) = json.loads(run.stdout)
    assert report["eval_tokens"] > 0 and report["kl_divergence"] == 0 and report["perplexity"] > 1, report
    print(f"\n{what}: {run.seconds:.1f} s under {LIMIT // MiB} MiB, high-water mark {run.max_usage_bytes}")
