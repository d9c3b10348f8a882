"""The report: report.json schema, report.md, the terminal table, measure_stage, and the run summary."""

from __future__ import annotations

import copy
import json

import pytest

from exporters.report import (
    ArtifactReport,
    QualityInfo,
    SizeInfo,
    StageCost,
    load_report,
    measure_stage,
    validate_report_json,
)
from exporters.report_text import print_reports
from exporters.summary import summary_figure, write_summary
from mergeq.core.errors import MergeqError

FP16 = 269_060_352


def make_report(fmt: str, quant: str, size: int, ppl: float | None, *, kl: float = 0.01) -> ArtifactReport:
    quality = (
        None
        if ppl is None
        else QualityInfo(
            perplexity=ppl,
            reference_perplexity=15.0,
            kl_divergence=kl,
            top1_agreement=0.9,
            eval_tokens=4080,
            text_sha256="ab" * 32,
            context_length=512,
            evaluator="llama.cpp" if fmt == "gguf" else "torch",
            windows=16,
            text_tokens=30000,
        )
    )
    return ArtifactReport(
        format=fmt,
        quant=quant,
        path=f"/out/{fmt}/{quant}",
        quality=quality,
        size=SizeInfo(
            size_bytes=size,
            fp16_bytes=FP16,
            bits_per_weight=16 * size / FP16,
            bits_per_quantized_weight=None if fmt == "hf" else 4.5,
            tensor_types={"F32": 61, "Q5_0": 120} if fmt == "gguf" else {},
            fallbacks=[
                {
                    "tensor": "blk.0.attn_q.weight",
                    "wanted": "Q4_K",
                    "got": "Q5_0",
                    "why": "576 columns are not a multiple of 256",
                }
            ]
            if fmt == "gguf"
            else [],
        ),
        stages={"export": StageCost(12.5, 900 * 2**20), "eval": StageCost(30.25, 1200 * 2**20)},
        provenance={"model_sha256": "cd" * 32, "options": {"quant": quant}},
        warnings=["group size 128 does not divide 576; used 64"] if fmt == "awq" else [],
    )


REPORTS = [
    make_report("hf", "f16", FP16, 15.0, kl=0.0),
    make_report("gguf", "Q8_0", 145_000_000, 15.05),
    make_report("gguf", "Q4_K_M", 105_000_000, 16.4),
    make_report("awq", "w4g64-asym", 110_000_000, 16.9),
]


def test_report_json_and_md_are_written_and_validate(tmp_path):
    report = REPORTS[2]
    path = report.write(tmp_path)
    data = json.loads(path.read_text())
    validate_report_json(data)
    for key in (
        "format",
        "quant",
        "size_bytes",
        "bits_per_weight",
        "perplexity",
        "reference_perplexity",
        "kl_divergence",
        "top1_agreement",
        "eval_tokens",
        "seconds",
        "warnings",
    ):
        assert key in data
    assert data["schema_version"] == 1 and data["perplexity_ratio"] == pytest.approx(16.4 / 15.0)
    assert data["seconds"] == {"export": 12.5, "eval": 30.25}
    assert load_report(path) == report  # the JSON holds everything the report has
    md = (tmp_path / "report.md").read_text()
    for fact in (
        "gguf Q4_K_M",
        "16.4000",
        "15.0000",
        "4080",
        "blk.0.attn_q.weight",
        "Q5_0 | 120",
        "576 columns",
        "ab" * 32,
        "| eval | 30.2 | 1200.0 |",
    ):
        assert fact in md, fact


def test_report_without_quality_and_with_nan_sizes(tmp_path):
    report = make_report("gptq", "w4g64", 100, None)
    report.size.fp16_bytes = 0  # ratio is NaN: JSON has no NaN, it becomes null
    data = json.loads(report.write(tmp_path).read_text())
    assert data["ratio_to_fp16"] is None and data["perplexity"] is None and data["eval"] is None
    assert "Not evaluated." in (tmp_path / "report.md").read_text()
    assert load_report(tmp_path / "report.json").quality is None


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("kl_divergence"), "kl_divergence: missing"),
        (lambda d: d.update(size_bytes="12"), "size_bytes: expected integer"),
        (lambda d: d.update(schema_version=2), "schema_version is 2"),
        (lambda d: d.update(top1_agreement=1.5, eval={**d["eval"], "top1_agreement": 1.5}), "top1_agreement: must lie"),
        (lambda d: d.update(perplexity=3.0), "perplexity: disagrees with eval.perplexity"),
        (lambda d: d["eval"].pop("text_sha256"), "eval.text_sha256: missing"),
        (lambda d: d.update(warnings=[1]), "warnings: expected an array of strings"),
        (lambda d: d["seconds"].update(eval="long"), "seconds.eval: expected number"),
        (lambda d: d.update(eval=None), "perplexity: must be null without eval"),
    ],
)
def test_schema_rejects_bad_reports(mutate, message, tmp_path):
    data = copy.deepcopy(REPORTS[1].to_json())
    validate_report_json(copy.deepcopy(data))
    mutate(data)
    with pytest.raises(MergeqError, match=message):
        validate_report_json(data)
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(MergeqError, match="report .*report.json"):
        load_report(tmp_path / "report.json")


def test_measure_stage_records_and_accumulates():
    report = make_report("hf", "f16", 1, None)
    report.stages = {}
    with measure_stage(report, "eval"):
        blob = bytearray(64 * 2**20)  # touch 64 MiB so the high-water mark is at least that
        blob[::4096] = b"x" * len(blob[::4096])
    first = report.stages["eval"]
    assert first.seconds > 0 and first.peak_rss_bytes >= 64 * 2**20
    with measure_stage(report, "eval"):
        pass
    assert report.stages["eval"].seconds >= first.seconds
    assert report.stages["eval"].peak_rss_bytes >= first.peak_rss_bytes
    with pytest.raises(RuntimeError), measure_stage(report, "failing"):
        raise RuntimeError("boom")
    assert "failing" not in report.stages


def test_terminal_table_and_json(capsys):
    print_reports(REPORTS)
    out = capsys.readouterr().out
    for fact in ("gguf Q4_K_M", "awq w4g64-asym", "16.400", "1.0933", "group size 128"):
        assert fact in out, fact
    print_reports(REPORTS, as_json=True)
    data = json.loads(capsys.readouterr().out)
    assert [d["quant"] for d in data] == ["f16", "Q8_0", "Q4_K_M", "w4g64-asym"]


def test_summary_files_chart_points_and_deterministic_png(tmp_path):
    reports = REPORTS + [make_report("gptq", "w4g64", 100_000_000, None)]  # not evaluated: not plotted
    fig = summary_figure(reports)
    ax = fig.axes[0]
    points = next(c for c in ax.collections if c.get_gid() == "artifacts")
    assert len(points.get_offsets()) == len(REPORTS)  # one point per evaluated artifact
    assert sorted(points.get_offsets()[:, 1].tolist()) == sorted(r.quality.perplexity for r in REPORTS)
    star = next(c for c in ax.collections if c.get_gid() == "reference")
    assert star.get_offsets().tolist() == [[FP16 / 2**20, 15.0]]
    labels = [t.get_text() for t in ax.texts]
    assert sum("Q4_K_M" in t for t in labels) == 1 and any("fp16 reference" in t for t in labels)
    assert "without evaluation not shown" in ax.get_title()
    assert "size" in ax.get_xlabel() and "perplexity" in ax.get_ylabel()

    paths = write_summary(reports, tmp_path / "a")
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in png[-12:]
    import matplotlib.image

    assert matplotlib.image.imread(paths["png"]).shape[:2] == (550, 1300)
    assert b"Software" not in png and b"matplotlib" not in png
    again = write_summary(reports, tmp_path / "b")
    assert again["png"].read_bytes() == png  # same reports, same bytes
    summary = json.loads(paths["json"].read_text())
    assert summary["schema_version"] == 1 and len(summary["artifacts"]) == 5
    for entry in summary["artifacts"]:
        validate_report_json(entry)
    md = paths["md"].read_text()
    assert md.count("| gguf ") == 2 and "summary.png" in md and "awq w4g64-asym: group size 128" in md


def test_labels_do_not_overlap_and_budgeted_mixes_are_on_the_kl_panel():
    """AWQ and GPTQ of nearly the same size and perplexity (the demo's) used to get colliding labels."""
    close = [
        make_report("hf", "f16", FP16, 11.342, kl=0.0),
        make_report("gguf", "Q8_0", 144_800_000, 11.381, kl=0.0034),
        make_report("gguf", "Q4_K_M", 105_500_000, 11.755, kl=0.044),
        make_report("awq", "w4g64-asym", 117_500_000, 12.221, kl=0.099),
        make_report("gptq", "w4g64-sym", 118_200_000, 12.272, kl=0.081),
        make_report("gguf", "MIX-like-Q4_K_M", 105_400_000, 11.52, kl=0.025),
        make_report("gguf", "Q3_K_M", 95_000_000, 12.6, kl=0.09),
        make_report("gguf", "MIX-like-Q3_K_M", 94_900_000, 11.9, kl=0.05),
    ]
    for r in close[-3::2]:
        r.extra["budget"] = {"target": r.quant}
    from exporters.chart_labels import text_box

    fig = summary_figure(close)
    renderer = fig.canvas.get_renderer()
    ppl_ax, kl_ax = fig.axes
    for ax in (ppl_ax, kl_ax):
        boxes = [text_box(t, renderer) for t in ax.texts]
        assert len(boxes) >= 7
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert not a.overlaps(b), (ax.get_title(), a, b)
    diamonds = next(c for c in kl_ax.collections if c.get_gid() == "budgeted")
    assert sorted(diamonds.get_offsets()[:, 1].tolist()) == [0.025, 0.05]
    circles = next(c for c in kl_ax.collections if c.get_gid() == "named")
    assert len(circles.get_offsets()) == 5  # the reference (KL 0) has no place on a log axis
    assert "KL" in kl_ax.get_ylabel()
