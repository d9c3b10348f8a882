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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from exporters import chat_template_check
from exporters.gguf_inspect import read_gguf, read_ggufs, size_info
from exporters.llamacpp.build import ensure_built, find_build_tools, is_built, tool_command
from exporters.llamacpp.convert import converter_command, supported_architectures
from exporters.llamacpp.pin import canonical_quant_type, load_pin, version_info
from exporters.llamacpp.quantize import quantize
from exporters.llamacpp.run import run_tool
from exporters.registry import register
from exporters.report import ArtifactReport, StageCost
from mergeq.core.atomic import atomic_dir, remove_stale_tmp
from mergeq.core.errors import MergeqError
from mergeq.core.hashing import sha256_file, tree_hashes
from mergeq.core.modelfiles import read_model_config
from mergeq.core.options import OptionError, option
from mergeq.core.paths import free_bytes

log = logging.getLogger(__name__)

DEFAULT_QUANTS = ("Q8_0", "Q4_K_M")
INTERMEDIATES = ("f16", "bf16")
FLOAT_TYPES = {"F16": "f16", "BF16": "bf16"}
WORK_NAME = "gguf-work"  # OUT/.gguf-work.tmp-*: the intermediate and the imatrix, removed at the end
DISK_MARGIN = 1.05  # planned bytes are estimates: ask for 5% more (plus 64 MiB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Upper bound of the size of a quantized file relative to f16: the mixtures and fallbacks never put a
# quantized tensor above Q8_0 (8.5 bits) unless a shape forces F16, which planned_bytes covers by 1.0.
QUANTIZED_BOUND = 8.5 / 16


@dataclass(frozen=True)
class GGUFOptions:
    """The options of `mergeq export gguf` and of a pipeline's [gguf] table (mergeq.core.options)."""

    quants: tuple[str, ...] = option(
        DEFAULT_QUANTS,
        flag="--quant",
        key="quant",
        repeat=True,
        metavar="TYPE",
        help="llama-quantize type to write (repeatable or comma-separated): Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, "
        "IQ4_XS, ..., F16, BF16",
    )  # after checked(): llama-quantize spellings, request order, no duplicates
    imatrix: bool = option(False, help="quantize with an importance matrix computed by llama-imatrix from --calib")
    calib: Path | None = option(None, metavar="FILE", help="calibration text for --imatrix")
    imatrix_ctx: int = option(
        512,
        metavar="N",
        range=(8, None),
        help="llama-imatrix context (tokens per chunk; the text needs at least 2N tokens)",
    )
    intermediate: str = option(
        "auto",
        choices=("auto", *INTERMEDIATES),
        help="type of the one intermediate GGUF (auto: bf16 for bfloat16 checkpoints, else f16)",
    )
    threads: int | None = option(None, metavar="N", range=(1, None), default_help="all cores", help="llama.cpp threads")
    # size budgets (exporters/gguf_budget): after checked(), every one in `targets` as "2.5GB", "4.5bpw" or
    # "like:Q4_K_M"; each makes one more GGUF, OUT/MIX-.../, with the least predicted divergence at that size
    targets: tuple[str, ...] = option(
        (),
        flag="--target",
        key="target",
        repeat=True,
        metavar="SIZE|like:TYPE",
        help="a GGUF that fits this size, its types chosen tensor by tensor from measurements (needs --imatrix "
        "--calib): a file size (2.5GB, 700MiB), bits per weight (4.5bpw) or like:TYPE (the size of that "
        "named mix, e.g. like:Q4_K_M); repeatable",
    )
    target_size: str | None = option(
        None, metavar="SIZE", toml=False, help="the same as --target SIZE: a file size such as 2.5GB or 700MiB"
    )
    target_bpw: float | None = option(
        None,
        metavar="BITS",
        range=(1.0, 16.0),
        toml=False,
        help="the same as --target BITSbpw: bits per weight over the whole file",
    )

    def checked(self) -> GGUFOptions:
        """The quant types canonical (llama-quantize's spelling, comma lists split, no duplicates), and the
        imatrix options consistent."""
        requested = [part.strip() for value in self.quants for part in str(value).split(",") if part.strip()]
        quants: list[str] = []
        pin = load_pin()
        for name in requested:
            canonical = canonical_quant_type(name, pin)
            if canonical is None or canonical == "COPY":
                known = ", ".join(t for t in pin.quant_types if t != "COPY")
                raise OptionError(
                    "quants",
                    f"--quant {name!r} is not a llama-quantize type",
                    hint=f"llama.cpp {pin.commit} (llama-cpp-python {pin.version}) knows: {known}",
                )
            if canonical not in quants:
                quants.append(canonical)
        if self.imatrix and self.calib is None:
            raise OptionError(
                "calib", "--imatrix needs --calib FILE: the text that llama-imatrix runs through the model"
            )
        if self.calib is not None and not self.imatrix:
            raise OptionError("calib", "--calib is only used with --imatrix", hint="add --imatrix, or drop --calib")
        if not self.imatrix and (need := [q for q in quants if q in pin.needs_imatrix]):
            raise OptionError(
                "quants",
                f"--quant {', '.join(need)} requires an importance matrix",
                hint="add --imatrix --calib FILE, or choose e.g. IQ4_XS, Q3_K_M or Q4_K_M",
            )
        targets = list(self.targets)
        if self.target_size is not None:
            targets.append(self.target_size)
        if self.target_bpw is not None:
            targets.append(f"{self.target_bpw:g}bpw")
        if targets:
            from exporters.gguf_budget.target import check_targets

            try:
                check_targets(tuple(targets), self.imatrix, pin.quant_types)
            except MergeqError as err:
                raise OptionError("targets", str(err.args[0]), hint=err.hint) from None
        return replace(self, quants=tuple(quants), targets=tuple(targets), target_size=None, target_bpw=None)


# ----------------------------------------------------------------------------------------------- model facts


def architecture(config: dict) -> str | None:
    """The architecture name the converter routes on (the text model's, for a multimodal config)."""
    text = config.get("text_config") or {}
    if text.get("architectures"):
        return text["architectures"][0]
    arches = config.get("architectures") or []
    return arches[0] if arches else None


# Architectures whose layer layout the pinned converter does not write: llama.cpp assumes one (for Gemma 3: every
# sixth layer global, the rest sliding-window, its load_swa_pattern(6)); name -> (period, what the layout is)
FIXED_LAYER_LAYOUTS = {
    "Gemma3ForCausalLM": (6, "five sliding-window layers, then one global layer, repeated"),
    "Gemma3ForConditionalGeneration": (6, "five sliding-window layers, then one global layer, repeated"),
}


def check_layer_layout(config: dict, arch: str, config_path: Path) -> None:
    """Refuse a checkpoint whose `layer_types` differ from the layout llama.cpp assumes for its architecture: the
    GGUF would compute another model than the checkpoint, without any error from the converter."""
    if arch not in FIXED_LAYER_LAYOUTS:
        return
    period, described = FIXED_LAYER_LAYOUTS[arch]
    text = config.get("text_config") or config
    layer_types = text.get("layer_types")
    if not layer_types or not text.get("sliding_window"):
        return
    assumed = ["full_attention" if i % period == period - 1 else "sliding_attention" for i in range(len(layer_types))]
    if list(layer_types) != assumed:
        first = next(i for i, (a, b) in enumerate(zip(layer_types, assumed)) if a != b)
        raise MergeqError(
            f"{config_path}: layer_types give layer {first} {layer_types[first]!r}, but the pinned llama.cpp "
            f"converter does not write the layer layout and llama.cpp assumes {described} for {arch} "
            f"({assumed[first]!r} there): the GGUF would compute another model",
            hint="export this model with `mergeq export awq` or `gptq` instead",
        )


def intermediate_type(config: dict, options: GGUFOptions) -> str:
    if options.intermediate != "auto":
        return options.intermediate
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return "bf16" if "bfloat16" in dtype else "f16"


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def f16_bytes_estimate(model_dir: Path, config: dict) -> int:
    """About what the model takes at 16 bits: its weight files, scaled by the stored element size."""
    total = sum(p.stat().st_size for p in weight_files(model_dir))
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return total // 2 if "float32" in dtype else total


def planned_bytes(quant: str, f16_bytes: int) -> int:
    if quant in ("F16", "BF16"):
        return f16_bytes
    if quant == "F32":
        return 2 * f16_bytes
    return int(f16_bytes * QUANTIZED_BOUND)


def chat_template(model_dir: Path) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's."""
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = Path(model_dir) / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def check_disk(model_dir: Path, config: dict, options: GGUFOptions, where: Path) -> dict[str, int]:
    """Raise unless `where` has room for the intermediate and every planned file; returns the plan."""
    inter = intermediate_type(config, options)
    f16 = f16_bytes_estimate(model_dir, config)
    plan = {"intermediate": f16}
    for quant in options.quants:
        if FLOAT_TYPES.get(quant) != inter:  # the intermediate itself becomes that artifact
            plan[quant] = planned_bytes(quant, f16)
    for target in options.targets:  # each mix, and the named mix it is compared with (kept if the mix loses)
        plan[f"target {target}"] = 2 * planned_bytes("Q8_0", f16)
    if options.targets:  # the search holds its all-Q8_0 round, one more mix and the f16 logits at a time
        plan["size-budget search"] = 2 * planned_bytes("Q8_0", f16) + (256 << 20)
    need = int(sum(plan.values()) * DISK_MARGIN) + (64 << 20)
    if (free := free_bytes(where)) < need:
        detail = ", ".join(f"{k} ~{v / 2**20:.0f} MiB" for k, v in plan.items())
        raise MergeqError(
            f"not enough free disk for the GGUF export: about {need / 2**20:.0f} MiB needed "
            f"({detail}), {free / 2**20:.0f} MiB free at {where}",
            hint="free some space, or choose fewer --quant types",
        )
    return plan


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
        """Everything checkable before work: architecture, weights, tokenizer, calibration text, disk, build tools."""
        model_dir = Path(model_dir)
        config = read_model_config(model_dir)
        warnings: list[str] = []
        if options.targets:
            from exporters.gguf_budget.target import check_targets

            check_targets(options.targets, options.imatrix, load_pin().quant_types)
        arch = architecture(config)
        supported = supported_architectures()
        if arch is None:
            raise MergeqError(
                f'{model_dir / "config.json"} names no architecture ("architectures" is missing)',
                hint="the converter picks its model class by that name",
            )
        if arch not in supported:
            pin = load_pin()
            raise MergeqError(
                f"architecture {arch!r} ({model_dir / 'config.json'}) is not supported by the pinned llama.cpp "
                f"converter ({pin.commit}); it supports {len(supported)} architectures: {', '.join(supported)}",
                hint="export this model with `mergeq export awq` or `gptq` instead",
            )
        check_layer_layout(config, arch, model_dir / "config.json")
        if not weight_files(model_dir):
            raise MergeqError(f"{model_dir} holds no .safetensors or .bin weights")
        if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
            raise MergeqError(
                f"{model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)})",
                hint="save the tokenizer next to the merged weights: GGUF files carry it",
            )
        if chat_template(model_dir) is None:
            warnings.append(f"{model_dir} has no chat template; the GGUF files will carry none")
        if options.imatrix:
            calib = Path(options.calib)
            if not calib.is_file():
                raise MergeqError(f"calibration text {calib} does not exist", hint="pass a text file with --calib")
            if calib.stat().st_size == 0:
                raise MergeqError(f"calibration text {calib} is empty")
        check_disk(model_dir, config, options, model_dir)  # export() checks again where OUT really is
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
        hashes["calib_sha256"] = sha256_file(options.calib)
    return hashes


def _jsonable(data):
    return json.loads(json.dumps(data, default=str))


def convert(model_dir: Path, outfile: Path, outtype: str = "f16") -> Path:
    """One GGUF of `model_dir` by the pinned converter, written atomically (for callers other than export,
    e.g. an evaluator that needs the f16 GGUF of a reference checkpoint)."""
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(outfile)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outfile.name}.tmp-", dir=outfile.parent))
    try:
        run_tool(
            converter_command(model_dir, tmp / outfile.name, outtype),
            hint="the pinned converter could not read this checkpoint",
        )
        os.replace(tmp / outfile.name, outfile)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return outfile
