"""The `gguf` exporter: a merged checkpoint -> GGUF files made by the pinned llama.cpp's own tools.

    mergeq export gguf --model DIR --out DIR --quant Q4_K_M [--quant Q8_0 ...] [--imatrix --calib FILE]

The pinned convert_hf_to_gguf.py writes one f16 (or bf16) intermediate GGUF, once; llama-quantize makes
every requested type from it (`f16`/`bf16` themselves are the intermediate or a copy of it). With
`--imatrix`, llama-imatrix first computes an importance matrix from the calibration text.

Output layout, one directory per requested type (the orchestration writes report.json next to each):

    OUT/<TYPE>/<model>-<TYPE>.gguf     e.g. OUT/Q4_K_M/merged-Q4_K_M.gguf
    OUT/<TYPE>/report.json

Each type directory appears in one rename when its GGUF is complete; the intermediate and the imatrix
live in OUT/.gguf-work.tmp-*/ and are removed at the end. A killed export leaves only `.…tmp-…` entries
(removed by the next run), never a finished-looking GGUF.

The options: exporters/gguf_options.py; the checks before work: exporters/gguf_preflight.py; this module runs the
sequence and writes the reports.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from exporters import chat_template_check
from exporters.gguf_inspect import read_gguf, read_ggufs, size_info
from exporters.gguf_options import FLOAT_TYPES, GGUFOptions
from exporters.gguf_preflight import chat_template, check_disk, check_input, intermediate_type
from exporters.llamacpp.build import ensure_built, find_build_tools, is_built, tool_command
from exporters.llamacpp.convert import converter_command
from exporters.llamacpp.pin import load_pin, version_info
from exporters.llamacpp.quantize import quantize
from exporters.llamacpp.run import run_tool
from exporters.registry import register
from exporters.report import ArtifactReport, StageCost
from mergeq.core.atomic import atomic_dir, remove_stale_tmp
from mergeq.core.hashing import file_digest, tree_hashes
from mergeq.core.modelfiles import read_model_config

log = logging.getLogger(__name__)

WORK_NAME = "gguf-work"  # OUT/.gguf-work.tmp-*: the intermediate and the imatrix, removed at the end


# ----------------------------------------------------------------------------------------------- the exporter


@register("gguf", GGUFOptions)
class GGUFExporter:
    """GGUF files for llama.cpp, made by the pinned llama.cpp converter and llama-quantize"""

    def __init__(self) -> None:
        self._preflight_warnings: list[str] = []
        self._budget: dict = {}  # label -> gguf_budget.artifacts.BudgetArtifact, for the reports
        self._template_reference: chat_template_check.PendingReference | None = None  # started by export()

    # -- preflight

    def preflight(self, model_dir: Path, options: GGUFOptions) -> list[str]:
        """Everything checkable before work: the input (exporters/gguf_preflight.py), then the build tools."""
        warnings = check_input(Path(model_dir), options)
        self._preflight_warnings = list(warnings)  # facts about the input: they go into every report
        if not is_built():
            find_build_tools()  # raises a clear error now rather than after the merge
            warnings.append(
                "llama.cpp is not built yet: the export builds it first (a few minutes, once); "
                "`mergeq setup-llamacpp` does it ahead of time"
            )
        return warnings

    # -- export

    def export(self, model_dir: Path, out_dir: Path, options: GGUFOptions) -> list[ArtifactReport]:
        model_dir, out_dir = Path(model_dir), Path(out_dir)
        config = read_model_config(model_dir)
        inter = intermediate_type(config, options)
        stem = model_dir.resolve().name
        check_disk(model_dir, config, options, out_dir)
        ensure_built()
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out_dir / WORK_NAME)
        work = Path(tempfile.mkdtemp(prefix=f".{WORK_NAME}.tmp-", dir=out_dir))
        hasher = ThreadPoolExecutor(max_workers=1)
        # transformers' side of the chat template round trip: a subprocess that overlaps with the conversion
        self._template_reference = (
            chat_template_check.PendingReference(model_dir) if chat_template(model_dir) is not None else None
        )
        try:
            inputs: Future = hasher.submit(_input_hashes, model_dir, options)
            return self._export(model_dir, out_dir, options, inter, stem, work, inputs)
        finally:
            hasher.shutdown(wait=True)
            if self._template_reference is not None:
                self._template_reference.cancel()  # still running only when the export failed
            shutil.rmtree(work, ignore_errors=True)

    def _export(self, model_dir, out_dir, options, inter, stem, work, inputs) -> list[ArtifactReport]:
        from mergeq.core.progress import progress_bar

        threads = ("-t", str(options.threads)) if options.threads else ()
        stages: dict[str, StageCost] = {}
        logs: dict[str, str] = {}
        intermediate = work / f"{stem}-{inter.upper()}.gguf"
        steps = 1 + int(options.imatrix) + len(options.quants) + int(bool(options.targets))
        with progress_bar() as bar:
            task = bar.add_task(f"GGUF: convert to {inter}", total=steps)
            result = run_tool(
                converter_command(model_dir, intermediate, inter),
                hint="the pinned converter could not read this checkpoint",
            )
            stages["convert"] = StageCost(round(result.seconds, 3), result.peak_rss_bytes)
            bar.advance(task)
            imatrix_file = None
            if options.imatrix:
                bar.update(task, description="GGUF: llama-imatrix")
                imatrix_file = work / "imatrix.gguf"
                result = run_tool(
                    tool_command(
                        "llama-imatrix",
                        "-m",
                        intermediate,
                        "-f",
                        options.calib,
                        "-o",
                        imatrix_file,
                        "-c",
                        str(options.imatrix_ctx),
                        "--no-ppl",
                        *threads,
                    ),
                    hint=f"if it reports too few tokens: the calibration text needs at least 2 x --imatrix-ctx "
                    f"({2 * options.imatrix_ctx}) tokens; give a longer --calib or a smaller --imatrix-ctx",
                )
                stages["imatrix"] = StageCost(round(result.seconds, 3), result.peak_rss_bytes)
                bar.advance(task)
            finals: dict[str, Path] = {}
            keep_intermediate = None
            for quant in options.quants:
                final_dir = out_dir / quant
                name = f"{stem}-{quant}.gguf"
                if FLOAT_TYPES.get(quant) == inter:
                    keep_intermediate = quant  # moved into place after the other types are made from it
                    finals[quant] = final_dir / name
                    continue
                bar.update(task, description=f"GGUF: llama-quantize {quant}")
                with atomic_dir(final_dir, overwrite=True) as tmp:
                    # the imatrix is given by name from its folder: llama-quantize records the argument in the
                    # file (quantize.imatrix.file), and a temporary folder's path would change the bytes each run
                    result = quantize(
                        intermediate,
                        tmp / name,
                        quant,
                        imatrix_file if quant not in FLOAT_TYPES else None,
                        options.threads,
                        hint=_quantize_hint(quant),
                    )
                stages[f"quantize_{quant}"] = StageCost(round(result.seconds, 3), result.peak_rss_bytes)
                logs[quant] = result.stdout + result.stderr
                finals[quant] = final_dir / name
                bar.advance(task)
            if options.targets:
                started = time.perf_counter()
                bar.update(task, description="GGUF: size-budget search")
                made = self._budget_mixes(
                    model_dir,
                    out_dir,
                    options,
                    stem,
                    intermediate,
                    imatrix_file,
                    work,
                    lambda step: bar.update(task, description=f"GGUF: {step}"),
                )
                cost = StageCost(round(time.perf_counter() - started, 3), 0)
                for artifact in made:
                    finals[artifact.label], logs[artifact.label] = artifact.path, artifact.log
                    stages[f"quantize_{artifact.label}"] = cost
                bar.advance(task)
            if keep_intermediate is not None:
                with atomic_dir(out_dir / keep_intermediate, overwrite=True) as tmp:
                    os.replace(intermediate, tmp / finals[keep_intermediate].name)
                bar.advance(task)
        return self._reports(model_dir, options, inter, finals, stages, logs, inputs.result(), imatrix_file is not None)

    def _budget_mixes(self, model_dir, out_dir, options, stem, intermediate, imatrix_file, work, on_step):
        """The size-budgeted mixes (exporters/gguf_budget); their report sections wait in self._budget."""
        from exporters.gguf_budget import artifacts
        from exporters.gguf_budget.search import SearchSettings
        from exporters.gguf_budget.target import check_targets

        targets = check_targets(options.targets, options.imatrix, load_pin().quant_types)
        parameters = read_gguf(intermediate).parameters
        settings = SearchSettings(n_ctx=options.imatrix_ctx, threads=options.threads)
        made, _ = artifacts.make(
            intermediate,
            imatrix_file,
            options.calib,
            targets,
            work / "budget",
            out_dir,
            stem,
            parameters,
            requested=options.quants,
            settings=settings,
            on_step=on_step,
        )
        self._budget = {a.label: a for a in made}
        return made

    def _reports(self, model_dir, options, inter, finals, stages, logs, input_hashes, used_imatrix):
        pin = load_pin()
        summaries = read_ggufs(list(finals.values()))
        template = chat_template(model_dir)
        template_checks = chat_template_check.check_ggufs(model_dir, list(finals.values()), self._template_reference)
        reports = []
        for (quant, path), summary, template_check in zip(finals.items(), summaries, template_checks):
            size, warnings = size_info(summary, quant, pin.default_types.get(quant), logs.get(quant))
            warnings = self._preflight_warnings + warnings
            budget = self._budget.get(quant)
            if budget is not None:
                warnings += budget.warnings
            shape_fallbacks = [f for f in size.fallbacks if f["kind"] == "shape"]
            if shape_fallbacks:
                cols = sorted({f["columns"] for f in shape_fallbacks})
                warnings.append(
                    f"{quant}: {len(shape_fallbacks)} of {sum(t.is_matrix for t in summary.tensors)} weight matrices "
                    f"fell back to other types: their row length ({', '.join(map(str, cols))}) is not a multiple "
                    "of the block size of the requested type (see fallbacks)"
                )
            stored_template = summary.metadata.get("tokenizer.chat_template")
            if template is not None and stored_template != template:
                warnings.append(f"{quant}: the chat template in the GGUF differs from the checkpoint's")
            own = {"convert": stages["convert"]}
            if "imatrix" in stages:
                own["imatrix"] = stages["imatrix"]
            if f"quantize_{quant}" in stages:
                own["quantize"] = stages[f"quantize_{quant}"]
            own["chat_template"] = StageCost(  # the wall time it added; the transformers side overlaps the conversion
                template_check.wall_seconds,
                max(template_check.reference_peak_rss_bytes, template_check.server_peak_rss_bytes),
            )
            warnings += template_check.warnings(quant)
            reports.append(
                ArtifactReport(
                    format="gguf",
                    quant=quant,
                    path=str(path),
                    size=size,
                    stages=own,
                    provenance={
                        "inputs": input_hashes,
                        "options": _jsonable(asdict(options)),
                        "intermediate": inter,
                        "imatrix": {
                            "used": used_imatrix and quant not in FLOAT_TYPES,
                            "calib": str(options.calib) if options.calib else None,
                            "calib_sha256": input_hashes.get("calib_sha256"),
                            "ctx": options.imatrix_ctx if used_imatrix else None,
                        },
                        "tools": {"llama.cpp": version_info()},
                    },
                    warnings=warnings,
                    extra={
                        "gguf": {
                            "architecture": summary.metadata.get("general.architecture"),
                            "file_type": summary.metadata.get("general.file_type"),
                            "tensor_count": len(summary.tensors),
                            "parameters": summary.parameters,
                            "tokenizer_model": summary.metadata.get("tokenizer.ggml.model"),
                            "vocab_size": summary.array_lengths.get("tokenizer.ggml.tokens"),
                            "add_bos_token": summary.metadata.get("tokenizer.ggml.add_bos_token"),
                            "chat_template": stored_template is not None,
                            "chat_template_matches": None if template is None else stored_template == template,
                        },
                        "chat_template": template_check.to_json(),
                        **({"budget": budget.extra} if budget is not None and budget.extra else {}),
                    },
                )
            )
        return reports


def _quantize_hint(quant: str) -> str:
    return f"llama-quantize could not make {quant}; if it asks for an importance matrix, add --imatrix --calib FILE"


def _input_hashes(model_dir: Path, options: GGUFOptions) -> dict:
    hashes = {"model": tree_hashes(model_dir, recursive=False)}
    if options.calib is not None:
        hashes["calib_sha256"] = file_digest(options.calib)
    return hashes


def _jsonable(data):
    return json.loads(json.dumps(data, default=str))
