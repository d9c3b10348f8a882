"""The awq exporter: mergeq's own AWQ, streamed layer by layer, written for vLLM (awq gemm or compressed-tensors)."""

from __future__ import annotations

from pathlib import Path

from exporters.int4.export import Int4Options, add_int4_arguments, export_int4, options_from_args, plan
from exporters.registry import register
from exporters.report import ArtifactReport


@register("awq")
class AwqExporter:
    """int4 AWQ checkpoint for vLLM (quant_method awq, version gemm, or compressed-tensors pack-quantized)."""

    @classmethod
    def add_arguments(cls, parser) -> None:
        add_int4_arguments(parser, method="awq", samples=64, seq_len=256)

    @classmethod
    def options_from_args(cls, args) -> Int4Options:
        return options_from_args(args, "awq")

    def preflight(self, model_dir: Path, options: Int4Options) -> list[str]:
        the_plan = plan(Path(model_dir), options)
        return the_plan.warnings + the_plan.choices

    def export(self, model_dir: Path, out_dir: Path, options: Int4Options) -> list[ArtifactReport]:
        return [export_int4(Path(model_dir), Path(out_dir), options)]
