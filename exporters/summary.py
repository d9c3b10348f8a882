"""The summary of a run that made several artifacts: summary.json (every report.json), summary.md (the table)
and summary.png (size against perplexity and against KL divergence), written atomically with deterministic bytes."""

from __future__ import annotations

from pathlib import Path

from exporters.report import SCHEMA_VERSION, ArtifactReport
from exporters.report_text import TABLE_COLUMNS, report_rows
from mergeq.core.atomic import atomic_file, write_json, write_text


def summary_json(reports: list[ArtifactReport]) -> dict:
    return {"schema_version": SCHEMA_VERSION, "artifacts": [r.to_json() for r in reports]}


def summary_markdown(reports: list[ArtifactReport]) -> str:
    lines = [
        "# mergeq summary",
        "",
        "Quality is measured against the fp16 reference checkpoint; lower perplexity "
        "and KL are better; see docs/evaluation.md for the definitions.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in report_rows(reports)]
    q = next((r.quality for r in reports if r.quality), None)
    if q:
        lines += [
            "",
            f"Scored {q.eval_tokens} tokens ({q.windows} windows of {q.context_length}), text sha256 "
            f"`{q.text_sha256}`.",
            "",
            "![size against perplexity](summary.png)",
        ]
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
        ax.scatter(
            [fp16_bytes / 2**20], [ref_ppl], marker="*", s=260, c="gold", edgecolors="black", zorder=4, gid="reference"
        )
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
    handles = [
        Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="black", label=f)
        for f, c in FORMAT_COLORS.items()
        if any(r.format == f for r in shown)
    ]
    handles.append(
        Line2D(
            [],
            [],
            marker="*",
            linestyle="--",
            color="gray",
            markerfacecolor="gold",
            markeredgecolor="black",
            markersize=12,
            label="fp16 reference",
        )
    )
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.margins(x=0.25, y=0.2)

    diverged = [r for r in shown if r.quality.kl_divergence > 0]
    for gid, group, marker in (
        ("named", [r for r in diverged if not _budgeted(r)], "o"),
        ("budgeted", [r for r in diverged if _budgeted(r)], "D"),
    ):
        if group:
            kl_ax.scatter(
                [r.size.size_bytes / 2**20 for r in group],
                [r.quality.kl_divergence for r in group],
                c=[FORMAT_COLORS.get(r.format, "#666666") for r in group],
                marker=marker,
                s=60,
                zorder=3,
                gid=gid,
                edgecolors="black",
                linewidths=0.5,
            )
    kl_ax.set_yscale("log")
    kl_ax.set_xlabel("size on disk (MiB)")
    kl_ax.set_ylabel("mean KL divergence from the reference (nats, log scale)")
    kl_ax.set_title("Size against KL divergence\ncircles: named types; diamonds: size-budgeted GGUF mixes", fontsize=10)
    kl_ax.grid(True, alpha=0.3, which="both")
    kl_ax.margins(x=0.25, y=0.3)
    fig.tight_layout()
    points = list(zip(xs, ys))
    texts = [
        f"{r.label}\n{y:.2f} ppl (x{r.quality.perplexity_ratio:.3f}), {x:.0f} MiB" for r, x, y in zip(shown, xs, ys)
    ]
    if references:
        points.append((fp16_bytes / 2**20, ref_ppl))
        texts.append(f"fp16 reference\n{ref_ppl:.2f} ppl, {fp16_bytes / 2**20:.0f} MiB")
    place_labels(ax, points, texts)
    place_labels(
        kl_ax,
        [(r.size.size_bytes / 2**20, r.quality.kl_divergence) for r in diverged],
        [f"{r.label}\nKL {r.quality.kl_divergence:.4f}, {r.size.size_bytes / 2**20:.0f} MiB" for r in diverged],
    )
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
