"""An artifact report for people: report.md, and the table of several reports in the terminal (rich) and in
summary.md."""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING

from exporters.report import json_safe

if TYPE_CHECKING:
    from exporters.report import ArtifactReport


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def _mib(n: int | None) -> str:
    return _fmt(n / 2**20 if n is not None else None, ".1f")


def _ratio(report: ArtifactReport) -> float | None:
    return report.quality.perplexity_ratio if report.quality else None


def report_markdown(report: ArtifactReport) -> str:
    """report.md: the same facts as report.json, for people."""
    s, q = report.size, report.quality
    lines = [
        f"# {report.label}",
        "",
        f"Artifact: `{report.path}`",
        "",
        "## Size",
        "",
        "| bytes on disk | MiB | fp16 MiB | ratio to fp16 | bits/weight (whole file) "
        "| bits/weight (quantized tensors) |",
        "|---|---|---|---|---|---|",
        f"| {s.size_bytes} | {_mib(s.size_bytes)} | {_mib(s.fp16_bytes)} | {_fmt(s.ratio_to_fp16, '.3f')} "
        f"| {_fmt(s.bits_per_weight, '.3f')} | {_fmt(s.bits_per_quantized_weight, '.3f')} |",
        "",
    ]
    if s.tensor_types:
        lines += ["### Tensor types", "", "| type | tensors |", "|---|---|"]
        lines += [f"| {name} | {count} |" for name, count in sorted(s.tensor_types.items())]
        lines.append("")
    if s.fallbacks:
        lines += [
            f"### Fallbacks ({len(s.fallbacks)} tensors)",
            "",
            "| tensor | wanted | got | why |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {f.get('tensor', '')} | {f.get('wanted', '')} | {f.get('got', '')} | {f.get('why', '')} |"
            for f in s.fallbacks
        ]
        lines.append("")
    lines += ["## Quality", ""]
    if q is None:
        lines += ["Not evaluated.", ""]
    else:
        lines += [
            "| perplexity | reference perplexity | ratio | KL divergence (nats) | top-1 agreement |",
            "|---|---|---|---|---|",
            f"| {q.perplexity:.4f} | {q.reference_perplexity:.4f} | {q.perplexity_ratio:.4f} "
            f"| {q.kl_divergence:.6f} | {q.top1_agreement:.4f} |",
            "",
            f"Scored {q.eval_tokens} tokens: {q.windows} windows of {q.context_length} tokens, the second half "
            f"of each, out of {q.text_tokens} text tokens; evaluated by {q.evaluator}; text sha256 "
            f"`{q.text_sha256}`.",
            "",
        ]
    lines += ["## Cost", "", "| stage | seconds | peak RSS (MiB) |", "|---|---|---|"]
    lines += [f"| {name} | {cost.seconds:.1f} | {_mib(cost.peak_rss_bytes)} |" for name, cost in report.stages.items()]
    lines += ["", "Peak RSS is the process's high-water mark at the end of the stage (see docs/evaluation.md).", ""]
    lines += _chat_template_lines(report.extra.get("chat_template"))
    lines += _budget_lines(report.extra.get("budget"))
    if report.extra:
        lines += [
            "## Format facts",
            "",
            "```json",
            json.dumps(json_safe(report.extra), indent=2, sort_keys=True),
            "```",
            "",
        ]
    lines += [
        "## Provenance",
        "",
        "```json",
        json.dumps(json_safe(report.provenance), indent=2, sort_keys=True),
        "```",
        "",
    ]
    lines += ["## Warnings", ""] + ([f"- {w}" for w in report.warnings] or ["None."]) + [""]
    return "\n".join(lines)


def _budget_lines(section: dict | None) -> list[str]:
    """A size-budgeted GGUF (exporters/gguf_budget): predicted against measured, the named mix, every tensor's type."""
    if not section:
        return []
    named, measured = section["named_mix"], section["measured"]
    lines = [
        "## Size budget",
        "",
        f"Target `{section['target']}`: budget {section['budget_bytes']:,} bytes, file "
        f"{section['predicted_bytes']:,} bytes as predicted.",
        "",
        "| | bytes | KL predicted | KL measured | top-1 | ppl |",
        "|---|---|---|---|---|---|",
        f"| this mix | {section['predicted_bytes']:,} | {section['predicted_kl']:.5f} | {measured['kl']:.5f} "
        f"| {measured['top1']:.4f} | {measured['ppl']:.4f} |",
        f"| {named['type']} (named mix nearest in size) | {named['bytes']:,} | "
        f"{_fmt(named.get('predicted_kl'), '.5f')} | {named['kl']:.5f} | {named['top1']:.4f} "
        f"| {named['ppl']:.4f} |",
        "",
        f"KL here is measured on {section.get('kl_measured_on', 'the calibration text')}"
        + (f", weights {section['kl_weights']}" if section.get("kl_weights") else "")
        + "; "
        + (
            "this mix measures better than the named mix."
            if section["beats_named_mix"]
            else "this mix measures WORSE than the named mix, which is written beside it."
        ),
        "",
    ]
    candidates = section.get("candidates") or []
    if candidates:
        lines += [
            "Allocations the search measured (the factor on the types under the probes' bits; the least KL is kept):",
            "",
            "| factor | bytes | KL predicted | KL measured | kept |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['below']:.3g} | {c['bytes']:,} | {c['predicted_kl']:.5f} | {c['measured_kl']:.5f}"
            + (f" (same mix as {c['same_as_below']:.3g})" if "same_as_below" in c else "")
            + f" | {'yes' if c['chosen'] else ''} |"
            for c in candidates
        ]
        lines.append("")
    lines += ["| tensor | type |", "|---|---|"]
    lines += [f"| {name} | {qtype} |" for name, qtype in section["tensor_types"].items()]
    return lines + [""]


def _chat_template_lines(section: dict | None) -> list[str]:
    """The chat template round trip (exporters/chat_template_check.py): one row per transcript."""
    if not section:
        return []
    lines = [
        "## Chat template round trip",
        "",
        f"llama.cpp against transformers: {section['status']}"
        + (f" ({section['reason']})" if section.get("reason") else "")
        + (
            f", {section['matched']} of {section['checked']} transcripts give the same token IDs"
            if section.get("checked")
            else ""
        )
        + ".",
        "",
    ]
    if section.get("transcripts"):
        lines += ["| transcript | tokens (llama.cpp / transformers) | same | first difference |", "|---|---|---|---|"]
        for r in section["transcripts"]:
            where = r.get("error") or ""
            if r.get("first_difference") is not None:
                pieces = [
                    f"{side} {tok['id']} `{tok['piece']!r}`" if tok else f"{side} ends"
                    for side, tok in (("llama.cpp", r.get("llama_cpp")), ("transformers", r.get("transformers")))
                ]
                where = f"token {r['first_difference']}: " + ", ".join(pieces)
            lines.append(
                f"| {r['name']} | {r.get('llama_cpp_tokens')} / {r.get('transformers_tokens')} "
                f"| {'yes' if r['matched'] else 'no'} | {where} |"
            )
        lines.append("")
    return lines


TABLE_COLUMNS = ("artifact", "MiB", "x fp16", "bpw", "ppl", "ref ppl", "ppl ratio", "KL", "top-1", "tokens", "seconds")


def report_rows(reports: list[ArtifactReport]) -> list[tuple[str, ...]]:
    rows = []
    for r in reports:
        q = r.quality
        rows.append(
            (
                r.label,
                _mib(r.size.size_bytes),
                _fmt(r.size.ratio_to_fp16, ".3f"),
                _fmt(r.size.bits_per_weight, ".2f"),
                _fmt(q and q.perplexity, ".3f"),
                _fmt(q and q.reference_perplexity, ".3f"),
                _fmt(_ratio(r), ".4f"),
                _fmt(q and q.kl_divergence, ".5f"),
                _fmt(q and q.top1_agreement, ".3f"),
                _fmt(q and q.eval_tokens, "d"),
                _fmt(sum(c.seconds for c in r.stages.values()) if r.stages else None, ".1f"),
            )
        )
    return rows


def print_reports(reports: list[ArtifactReport], as_json: bool = False) -> None:
    """The reports as a rich table on stdout, with their warnings below; or as a JSON array."""
    if as_json:
        sys.stdout.write(json.dumps([r.to_json() for r in reports], indent=2, sort_keys=True) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mergeq artifacts (quality against the fp16 reference)")
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="left" if column == "artifact" else "right", no_wrap=True)
    for row in report_rows(reports):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped or captured: one line per artifact, not wrapped to 80 columns
    console.print(table)
    for r in reports:
        for warning in r.warnings:
            console.print(f"[yellow]warning[/yellow] {r.label}: {warning}", markup=True, highlight=False)
