"""The size and quality report that every artifact gets (report.json, report.md, a terminal table),
and the summary of a run that made several artifacts (summary.json, summary.md, summary.png).

Schema version 1, documented in docs/evaluation.md. Every exporter fills an ArtifactReport's `size`;
the evaluator fills its `quality` (exporters/evaluate.py). `measure_stage` records a stage's cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mergeq.core.atomic import atomic_file, write_json, write_text
from mergeq.core.errors import MergeqError
from mergeq.core.memory import peak_rss_bytes, reset_peak_rss

SCHEMA_VERSION = 1


@dataclass
class SizeInfo:
    size_bytes: int  # bytes on disk of the whole artifact
    fp16_bytes: int  # what the same model takes in fp16
    bits_per_weight: float  # over the whole artifact: 8 * size_bytes / total parameter count
    bits_per_quantized_weight: float | None  # over the quantized tensors only (None for fp16/bf16)
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count
    fallbacks: list[dict] = field(default_factory=list)  # {"tensor", "wanted", "got", "why"}

    @property
    def ratio_to_fp16(self) -> float:
        return self.size_bytes / self.fp16_bytes if self.fp16_bytes else float("nan")


@dataclass
class QualityInfo:
    perplexity: float
    reference_perplexity: float
    kl_divergence: float  # mean KL(reference || artifact) over scored tokens, nats
    top1_agreement: float  # fraction of scored tokens where both argmaxes agree
    eval_tokens: int  # scored tokens
    text_sha256: str
    context_length: int
    evaluator: str  # "torch" or "llama.cpp"
    windows: int = 0  # windows of context_length tokens scored
    text_tokens: int = 0  # tokens in the whole evaluation text (reference tokenizer, with BOS if it adds one)

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity


@dataclass
class StageCost:
    seconds: float
    peak_rss_bytes: int


@dataclass
class ArtifactReport:
    format: str  # "hf", "gguf", "awq", "gptq"
    quant: str  # "f16", "Q4_K_M", "w4g64-sym", ...
    path: str
    size: SizeInfo
    quality: QualityInfo | None = None
    stages: dict[str, StageCost] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # input hashes, options, tool versions
    warnings: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # format-specific facts (e.g. predicted vLLM kernel)

    @property
    def label(self) -> str:
        return f"{self.format} {self.quant}"

    def to_json(self) -> dict:
        q = self.quality
        data = {
            "schema_version": SCHEMA_VERSION,
            "format": self.format,
            "quant": self.quant,
            "path": self.path,
            "size_bytes": self.size.size_bytes,
            "fp16_bytes": self.size.fp16_bytes,
            "ratio_to_fp16": self.size.ratio_to_fp16,
            "bits_per_weight": self.size.bits_per_weight,
            "bits_per_quantized_weight": self.size.bits_per_quantized_weight,
            "tensor_types": self.size.tensor_types,
            "fallbacks": self.size.fallbacks,
            "perplexity": q.perplexity if q else None,
            "reference_perplexity": q.reference_perplexity if q else None,
            "perplexity_ratio": q.perplexity_ratio if q else None,
            "kl_divergence": q.kl_divergence if q else None,
            "top1_agreement": q.top1_agreement if q else None,
            "eval_tokens": q.eval_tokens if q else None,
            "eval": dataclasses.asdict(q) if q else None,
            "seconds": {name: cost.seconds for name, cost in self.stages.items()},
            "peak_rss_bytes": {name: cost.peak_rss_bytes for name, cost in self.stages.items()},
            "provenance": self.provenance,
            "warnings": self.warnings,
            "extra": self.extra,
        }
        return _finite(data)

    @classmethod
    def from_json(cls, data: dict) -> ArtifactReport:
        validate_report_json(data)
        size = SizeInfo(
            size_bytes=data["size_bytes"], fp16_bytes=data["fp16_bytes"], bits_per_weight=data["bits_per_weight"],
            bits_per_quantized_weight=data["bits_per_quantized_weight"], tensor_types=dict(data["tensor_types"]),
            fallbacks=list(data["fallbacks"]))
        quality = None
        if data.get("eval"):
            names = {f.name for f in dataclasses.fields(QualityInfo)}
            quality = QualityInfo(**{k: v for k, v in data["eval"].items() if k in names})
        stages = {name: StageCost(seconds, data["peak_rss_bytes"].get(name, 0))
                  for name, seconds in data["seconds"].items()}
        return cls(format=data["format"], quant=data["quant"], path=data["path"], size=size, quality=quality,
                   stages=stages, provenance=dict(data["provenance"]), warnings=list(data["warnings"]),
                   extra=dict(data.get("extra") or {}))

    def write(self, directory: Path) -> Path:
        """Write report.json and report.md into `directory`; return the report.json path."""
        path = Path(directory) / "report.json"
        data = self.to_json()
        validate_report_json(data)
        write_json(path, data)
        write_text(Path(directory) / "report.md", report_markdown(self))
        return path


def load_report(path: Path) -> ArtifactReport:
    """Read a report.json (any file written by ArtifactReport.write), validating its schema."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MergeqError(f"cannot read report {path}: {err}", hint="re-run the export that wrote it") from err
    try:
        return ArtifactReport.from_json(data)
    except MergeqError as err:
        raise MergeqError(f"report {path}: {err}", hint=err.hint) from err


def _finite(value):
    """JSON has no NaN or Infinity: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- cost


class StageMeter:
    """What `measure_stage` yields: child processes' peaks (measured by whoever ran them) go in here."""

    def __init__(self):
        self.child_peak = 0

    def child(self, peak_rss_bytes: int) -> None:
        self.child_peak = max(self.child_peak, peak_rss_bytes)


@contextlib.contextmanager
def measure_stage(report: ArtifactReport, name: str) -> Iterator[StageMeter]:
    """Add the wall seconds and the peak RSS of the enclosed block to `report.stages[name]`.

    Peak RSS is this process's high-water mark during the block (reset at its start where Linux allows,
    mergeq.core.memory) or the largest child peak handed to the meter, whichever is larger. Seconds of repeated
    stages add up; their peak is the larger one.
    """
    reset_peak_rss()
    meter = StageMeter()
    started = time.perf_counter()
    yield meter
    seconds = time.perf_counter() - started
    before = report.stages.get(name)
    report.stages[name] = StageCost(
        seconds=seconds + (before.seconds if before else 0.0),
        peak_rss_bytes=max(peak_rss_bytes(), meter.child_peak, before.peak_rss_bytes if before else 0))


# ------------------------------------------------------------------------------------------- schema

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))

# key -> accepted Python types of its JSON value (the schema version 1 of report.json)
REPORT_FIELDS: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "format": (str,),
    "quant": (str,),
    "path": (str,),
    "size_bytes": (int,),
    "fp16_bytes": (int,),
    "ratio_to_fp16": _OPT_NUM,
    "bits_per_weight": _OPT_NUM,
    "bits_per_quantized_weight": _OPT_NUM,
    "tensor_types": (dict,),
    "fallbacks": (list,),
    "perplexity": _OPT_NUM,
    "reference_perplexity": _OPT_NUM,
    "perplexity_ratio": _OPT_NUM,
    "kl_divergence": _OPT_NUM,
    "top1_agreement": _OPT_NUM,
    "eval_tokens": _OPT_INT,
    "eval": (dict, type(None)),
    "seconds": (dict,),
    "peak_rss_bytes": (dict,),
    "provenance": (dict,),
    "warnings": (list,),
    "extra": (dict,),
}
EVAL_FIELDS: dict[str, tuple[type, ...]] = {
    "perplexity": _NUM, "reference_perplexity": _NUM, "kl_divergence": _NUM, "top1_agreement": _NUM,
    "eval_tokens": (int,), "text_sha256": (str,), "context_length": (int,), "evaluator": (str,),
    "windows": (int,), "text_tokens": (int,),
}
QUALITY_KEYS = ("perplexity", "reference_perplexity", "perplexity_ratio", "kl_divergence", "top1_agreement",
                "eval_tokens")


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "integer", float: "number", str: "string", dict: "object", list: "array", type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _check(data: dict, fields: dict[str, tuple[type, ...]], where: str, problems: list[str]) -> None:
    for key, types in fields.items():
        if key not in data:
            problems.append(f"{where}{key}: missing")
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            problems.append(f"{where}{key}: expected {_type_names(types)}, got {type(value).__name__}")


def validate_report_json(data: dict) -> None:
    """Check a report.json object against schema version 1; raise MergeqError listing every problem."""
    if not isinstance(data, dict):
        raise MergeqError("a report must be a JSON object", hint="see docs/evaluation.md for the schema")
    problems: list[str] = []
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MergeqError(f"report schema_version is {version!r}, this mergeq reads {SCHEMA_VERSION}",
                          hint="re-run the export with this version of mergeq")
    _check(data, REPORT_FIELDS, "", problems)
    if not problems:
        if data["size_bytes"] < 0 or data["fp16_bytes"] < 0:
            problems.append("size_bytes and fp16_bytes must not be negative")
        for name, value in data["tensor_types"].items():
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"tensor_types.{name}: expected integer")
        for key in ("seconds", "peak_rss_bytes"):
            for name, value in data[key].items():
                if not isinstance(value, _NUM) or isinstance(value, bool):
                    problems.append(f"{key}.{name}: expected number")
        if not all(isinstance(w, str) for w in data["warnings"]):
            problems.append("warnings: expected an array of strings")
        if data["eval"] is None:
            problems += [f"{k}: must be null without eval" for k in QUALITY_KEYS if data[k] is not None]
        else:
            _check(data["eval"], EVAL_FIELDS, "eval.", problems)
            if not problems:
                problems += [f"{k}: disagrees with eval.{k}" for k in QUALITY_KEYS
                             if k in data["eval"] and data[k] != data["eval"][k]]
                top1 = data["top1_agreement"]
                if top1 is not None and not 0.0 <= top1 <= 1.0:
                    problems.append("top1_agreement: must lie in [0, 1]")
    if problems:
        raise MergeqError("report does not match schema version 1: " + "; ".join(problems),
                          hint="see docs/evaluation.md for the schema")


# -------------------------------------------------------------------------------------- formatting


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
    lines = [f"# {report.label}", "", f"Artifact: `{report.path}`", "", "## Size", "",
             "| bytes on disk | MiB | fp16 MiB | ratio to fp16 | bits/weight (whole file) "
             "| bits/weight (quantized tensors) |",
             "|---|---|---|---|---|---|",
             f"| {s.size_bytes} | {_mib(s.size_bytes)} | {_mib(s.fp16_bytes)} | {_fmt(s.ratio_to_fp16, '.3f')} "
             f"| {_fmt(s.bits_per_weight, '.3f')} | {_fmt(s.bits_per_quantized_weight, '.3f')} |", ""]
    if s.tensor_types:
        lines += ["### Tensor types", "", "| type | tensors |", "|---|---|"]
        lines += [f"| {name} | {count} |" for name, count in sorted(s.tensor_types.items())]
        lines.append("")
    if s.fallbacks:
        lines += [f"### Fallbacks ({len(s.fallbacks)} tensors)", "", "| tensor | wanted | got | why |",
                  "|---|---|---|---|"]
        lines += [f"| {f.get('tensor', '')} | {f.get('wanted', '')} | {f.get('got', '')} | {f.get('why', '')} |"
                  for f in s.fallbacks]
        lines.append("")
    lines += ["## Quality", ""]
    if q is None:
        lines += ["Not evaluated.", ""]
    else:
        lines += ["| perplexity | reference perplexity | ratio | KL divergence (nats) | top-1 agreement |",
                  "|---|---|---|---|---|",
                  f"| {q.perplexity:.4f} | {q.reference_perplexity:.4f} | {q.perplexity_ratio:.4f} "
                  f"| {q.kl_divergence:.6f} | {q.top1_agreement:.4f} |", "",
                  f"Scored {q.eval_tokens} tokens: {q.windows} windows of {q.context_length} tokens, the second half "
                  f"of each, out of {q.text_tokens} text tokens; evaluated by {q.evaluator}; text sha256 "
                  f"`{q.text_sha256}`.", ""]
    lines += ["## Cost", "", "| stage | seconds | peak RSS (MiB) |", "|---|---|---|"]
    lines += [f"| {name} | {cost.seconds:.1f} | {_mib(cost.peak_rss_bytes)} |" for name, cost in report.stages.items()]
    lines += ["", "Peak RSS is the process's high-water mark at the end of the stage (see docs/evaluation.md).", ""]
    lines += _chat_template_lines(report.extra.get("chat_template"))
    lines += _budget_lines(report.extra.get("budget"))
    if report.extra:
        lines += ["## Format facts", "", "```json", json.dumps(_finite(report.extra), indent=2, sort_keys=True),
                  "```", ""]
    lines += ["## Provenance", "", "```json", json.dumps(_finite(report.provenance), indent=2, sort_keys=True),
              "```", ""]
    lines += ["## Warnings", ""] + ([f"- {w}" for w in report.warnings] or ["None."]) + [""]
    return "\n".join(lines)


def _budget_lines(section: dict | None) -> list[str]:
    """A size-budgeted GGUF (exporters/gguf_budget): predicted against measured, the named mix, every tensor's type."""
    if not section:
        return []
    named, measured = section["named_mix"], section["measured"]
    lines = ["## Size budget", "", f"Target `{section['target']}`: budget {section['budget_bytes']:,} bytes, file "
             f"{section['predicted_bytes']:,} bytes as predicted.", "",
             "| | bytes | KL predicted | KL measured | top-1 | ppl |", "|---|---|---|---|---|---|",
             f"| this mix | {section['predicted_bytes']:,} | {section['predicted_kl']:.5f} | {measured['kl']:.5f} "
             f"| {measured['top1']:.4f} | {measured['ppl']:.4f} |",
             f"| {named['type']} (named mix nearest in size) | {named['bytes']:,} | "
             f"{_fmt(named.get('predicted_kl'), '.5f')} | {named['kl']:.5f} | {named['top1']:.4f} "
             f"| {named['ppl']:.4f} |",
             "", f"KL here is measured on {section.get('kl_measured_on', 'the calibration text')}; "
             + ("this mix measures better than the named mix." if section["beats_named_mix"]
                else "this mix measures WORSE than the named mix, which is written beside it."), "",
             "| tensor | type |", "|---|---|"]
    lines += [f"| {name} | {qtype} |" for name, qtype in section["tensor_types"].items()]
    return lines + [""]


def _chat_template_lines(section: dict | None) -> list[str]:
    """The chat template round trip (exporters/chat_template_check.py): one row per transcript."""
    if not section:
        return []
    lines = ["## Chat template round trip", "",
             f"llama.cpp against transformers: {section['status']}"
             + (f" ({section['reason']})" if section.get("reason") else "")
             + (f", {section['matched']} of {section['checked']} transcripts give the same token IDs"
                if section.get("checked") else "") + ".", ""]
    if section.get("transcripts"):
        lines += ["| transcript | tokens (llama.cpp / transformers) | same | first difference |", "|---|---|---|---|"]
        for r in section["transcripts"]:
            where = r.get("error") or ""
            if r.get("first_difference") is not None:
                pieces = [f"{side} {tok['id']} `{tok['piece']!r}`" if tok else f"{side} ends"
                          for side, tok in (("llama.cpp", r.get("llama_cpp")), ("transformers", r.get("transformers")))]
                where = f"token {r['first_difference']}: " + ", ".join(pieces)
            lines.append(f"| {r['name']} | {r.get('llama_cpp_tokens')} / {r.get('transformers_tokens')} "
                         f"| {'yes' if r['matched'] else 'no'} | {where} |")
        lines.append("")
    return lines


TABLE_COLUMNS = ("artifact", "MiB", "x fp16", "bpw", "ppl", "ref ppl", "ppl ratio", "KL", "top-1", "tokens", "seconds")


def report_rows(reports: list[ArtifactReport]) -> list[tuple[str, ...]]:
    rows = []
    for r in reports:
        q = r.quality
        rows.append((
            r.label, _mib(r.size.size_bytes), _fmt(r.size.ratio_to_fp16, ".3f"), _fmt(r.size.bits_per_weight, ".2f"),
            _fmt(q and q.perplexity, ".3f"), _fmt(q and q.reference_perplexity, ".3f"), _fmt(_ratio(r), ".4f"),
            _fmt(q and q.kl_divergence, ".5f"), _fmt(q and q.top1_agreement, ".3f"), _fmt(q and q.eval_tokens, "d"),
            _fmt(sum(c.seconds for c in r.stages.values()) if r.stages else None, ".1f")))
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


# ------------------------------------------------------------------------------------------ summary


def summary_json(reports: list[ArtifactReport]) -> dict:
    return {"schema_version": SCHEMA_VERSION, "artifacts": [r.to_json() for r in reports]}


def summary_markdown(reports: list[ArtifactReport]) -> str:
    lines = ["# mergeq summary", "", "Quality is measured against the fp16 reference checkpoint; lower perplexity "
             "and KL are better; see docs/evaluation.md for the definitions.", "",
             "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in report_rows(reports)]
    q = next((r.quality for r in reports if r.quality), None)
    if q:
        lines += ["", f"Scored {q.eval_tokens} tokens ({q.windows} windows of {q.context_length}), text sha256 "
                      f"`{q.text_sha256}`.", "", "![size against perplexity](summary.png)"]
    warned = [(r.label, w) for r in reports for w in r.warnings]
    if warned:
        lines += ["", "## Warnings", ""] + [f"- {label}: {w}" for label, w in warned]
    return "\n".join(lines) + "\n"


FORMAT_COLORS = {"hf": "#1b9e77", "gguf": "#d95f02", "awq": "#7570b3", "gptq": "#e7298a"}


def _budgeted(report: ArtifactReport) -> bool:
    return bool(report.extra.get("budget"))


def summary_figure(reports: list[ArtifactReport]):
    """Two panels over size on disk: perplexity (left: every evaluated artifact, the fp16 reference as a star and
    a line) and KL divergence (right, log scale: named types as circles, size-budgeted GGUF mixes as diamonds).
    Labels are placed so that they do not overlap (exporters/chart_labels.py)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from exporters.chart_labels import place_labels

    shown = [r for r in reports if r.quality is not None]
    fig = Figure(figsize=(13, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax, kl_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    xs = [r.size.size_bytes / 2**20 for r in shown]
    ys = [r.quality.perplexity for r in shown]
    colors = [FORMAT_COLORS.get(r.format, "#666666") for r in shown]
    ax.scatter(xs, ys, c=colors, s=60, zorder=3, gid="artifacts", edgecolors="black", linewidths=0.5)
    references = sorted({(r.size.fp16_bytes, r.quality.reference_perplexity) for r in shown if r.size.fp16_bytes})
    if references:
        fp16_bytes, ref_ppl = references[0]
        ax.scatter([fp16_bytes / 2**20], [ref_ppl], marker="*", s=260, c="gold", edgecolors="black", zorder=4,
                   gid="reference")
        ax.axhline(ref_ppl, color="gray", linestyle="--", linewidth=1, zorder=1)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity on the evaluation text (lower is better)")
    q = shown[0].quality if shown else None
    subtitle = f"{q.eval_tokens} scored tokens, context {q.context_length}" if q else "no evaluated artifacts"
    hidden = len(reports) - len(shown)
    if hidden:
        subtitle += f"; {hidden} artifact(s) without evaluation not shown"
    ax.set_title(f"Size against perplexity\n{subtitle}", fontsize=10)
    ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="black", label=f)
               for f, c in FORMAT_COLORS.items() if any(r.format == f for r in shown)]
    handles.append(Line2D([], [], marker="*", linestyle="--", color="gray", markerfacecolor="gold",
                          markeredgecolor="black", markersize=12, label="fp16 reference"))
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.margins(x=0.25, y=0.2)

    diverged = [r for r in shown if r.quality.kl_divergence > 0]
    for gid, group, marker in (("named", [r for r in diverged if not _budgeted(r)], "o"),
                               ("budgeted", [r for r in diverged if _budgeted(r)], "D")):
        if group:
            kl_ax.scatter([r.size.size_bytes / 2**20 for r in group], [r.quality.kl_divergence for r in group],
                          c=[FORMAT_COLORS.get(r.format, "#666666") for r in group], marker=marker, s=60, zorder=3,
                          gid=gid, edgecolors="black", linewidths=0.5)
    kl_ax.set_yscale("log")
    kl_ax.set_xlabel("size on disk (MiB)")
    kl_ax.set_ylabel("mean KL divergence from the reference (nats, log scale)")
    kl_ax.set_title("Size against KL divergence\ncircles: named types; diamonds: size-budgeted GGUF mixes",
                    fontsize=10)
    kl_ax.grid(True, alpha=0.3, which="both")
    kl_ax.margins(x=0.25, y=0.3)
    fig.tight_layout()
    points = list(zip(xs, ys))
    texts = [f"{r.label}\n{y:.2f} ppl (x{r.quality.perplexity_ratio:.3f}), {x:.0f} MiB"
             for r, x, y in zip(shown, xs, ys)]
    if references:
        points.append((fp16_bytes / 2**20, ref_ppl))
        texts.append(f"fp16 reference\n{ref_ppl:.2f} ppl, {fp16_bytes / 2**20:.0f} MiB")
    place_labels(ax, points, texts)
    place_labels(kl_ax, [(r.size.size_bytes / 2**20, r.quality.kl_divergence) for r in diverged],
                 [f"{r.label}\nKL {r.quality.kl_divergence:.4f}, {r.size.size_bytes / 2**20:.0f} MiB"
                  for r in diverged])
    return fig


def write_summary(reports: list[ArtifactReport], out_dir: Path) -> dict[str, Path]:
    """Write summary.json, summary.md and summary.png into out_dir (atomically, deterministic bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out_dir = Path(out_dir)
    paths = {"json": out_dir / "summary.json", "md": out_dir / "summary.md", "png": out_dir / "summary.png"}
    write_json(paths["json"], summary_json(reports))
    write_text(paths["md"], summary_markdown(reports))
    fig = summary_figure(reports)
    FigureCanvasAgg(fig)
    with atomic_file(paths["png"], "wb") as handle:
        fig.savefig(handle, format="png", metadata={"Software": None})
    return paths
