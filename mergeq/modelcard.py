"""Model cards: a README.md with Hugging Face YAML metadata and the measured table, ready to upload."""

from __future__ import annotations

from pathlib import Path

from exporters.report import ArtifactReport
from mergeq.core.atomic import write_text

LIBRARY = {"gguf": "gguf", "awq": "transformers", "gptq": "transformers", "hf": "transformers"}
SERVE = {
    "gguf": "llama-cli -m {file} -cnv",
    "awq": "vllm serve {dir} --dtype float16",  # no --quantization: vLLM picks the fastest kernel (README)
    "gptq": "vllm serve {dir} --dtype float16",
    "hf": "vllm serve {dir}",
}


def _yaml_value(value) -> str:
    text = str(value)
    return f'"{text}"' if any(c in text for c in ":#{}[],&*!|>%@`\"'") else text


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def model_card(reports: list[ArtifactReport], *, base_model: str) -> str:
    """The card for one artifact directory holding one or more reports of the same format."""
    fmt = reports[0].format
    meta = {
        "base_model": base_model,
        "library_name": LIBRARY.get(fmt, "transformers"),
        "tags": ["mergeq", fmt, *sorted({r.quant for r in reports})],
        "quantization": ", ".join(sorted({r.quant for r in reports})),
    }
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {_yaml_value(v)}" for v in value]
        else:
            lines.append(f"{key}: {_yaml_value(value)}")
    lines += [
        "---",
        "",
        f"# {Path(base_model).name} — {fmt} ({meta['quantization']})",
        "",
        f"Made by mergeq from `{base_model}`. Quality is measured against the merged fp16 checkpoint.",
        "",
        "| quant | size (MiB) | bits/weight | vs fp16 size | perplexity | ref. perplexity | KL (nats) | top-1 agree |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        q = r.quality
        lines.append(
            "| {} | {:.1f} | {:.2f} | {:.3f} | {} | {} | {} | {} |".format(
                r.quant,
                r.size.size_bytes / 2**20,
                r.size.bits_per_weight,
                r.size.ratio_to_fp16,
                _fmt(q and q.perplexity, ".3f"),
                _fmt(q and q.reference_perplexity, ".3f"),
                _fmt(q and q.kl_divergence, ".4f"),
                _fmt(q and q.top1_agreement, ".3f"),
            )
        )
    if reports[0].quality:
        q = reports[0].quality
        lines += [
            "",
            f"Evaluated on {q.eval_tokens} scored tokens, context {q.context_length}, "
            f"text sha256 `{q.text_sha256[:16]}…`, by {q.evaluator}.",
        ]
    warnings = sorted({w for r in reports for w in r.warnings})
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    first = Path(reports[0].path)  # final (a report written in a stage's temporary dir already names where it goes)
    lines += ["", "## Serve", "", "```", SERVE.get(fmt, "").format(file=first.name, dir=first.name), "```", ""]
    return "\n".join(lines)


def write_model_card(reports: list[ArtifactReport], *, base_model: str, artifact_dir: Path) -> Path:
    path = Path(artifact_dir) / "README.md"
    write_text(path, model_card(reports, base_model=base_model))
    return path
