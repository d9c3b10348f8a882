"""The int4 exporter, one class registered for `gptq` and for `awq` (each with its options dataclass,
exporters.int4.options): preflight plans the scheme; export calibrates, quantizes layer by layer into shards,
writes the config and side files, and reports."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from exporters.int4 import kernels
from exporters.int4.calibration import Calibration, load_calibration
from exporters.int4.checkpoint import TensorSource
from exporters.int4.exclude import Exclusions, resolve
from exporters.int4.families import family_of, require_awq
from exporters.int4.formats import FORMATS
from exporters.int4.layer import EngineOptions
from exporters.int4.layerwise import StreamResult, quantize_streaming
from exporters.int4.options import AwqOptions, GptqOptions, Int4Options
from exporters.int4.quant import QuantizedLinear, QuantScheme
from exporters.int4.resume import LayerCheckpoints, inputs_key
from exporters.registry import register
from exporters.report import ArtifactReport, SizeInfo, StageCost
from mergeq.core import VERSION
from mergeq.core.atomic import atomic_dir, write_json
from mergeq.core.device import resolve_device
from mergeq.core.errors import MergeqError
from mergeq.core.memory import peak_rss_bytes, reset_peak_rss
from mergeq.core.modelfiles import copy_aux_files, read_model_config
from mergeq.core.shards import ShardWriter
from mergeq.core.texts import FORMATS_HELP, split_column
from mergeq.core.versions import package_versions

log = logging.getLogger(__name__)

SHARD_BYTES = 1 << 30  # output buffered before a shard is written


@dataclass(frozen=True)
class Int4Exporter:
    """An int4 checkpoint for vLLM by mergeq's own GPTQ or AWQ (quant_method gptq / awq, version gemm, or
    compressed-tensors pack-quantized), streamed layer by layer."""

    method: str  # "gptq" or "awq": the options dataclass says the same (options.method)

    def preflight(self, model_dir: Path, options: Int4Options) -> list[str]:
        self._check_method(options)
        the_plan = plan(Path(model_dir), options)
        return the_plan.warnings + the_plan.choices

    def export(self, model_dir: Path, out_dir: Path, options: Int4Options) -> list[ArtifactReport]:
        self._check_method(options)
        return [export_int4(Path(model_dir), Path(out_dir), options)]

    def _check_method(self, options: Int4Options) -> None:
        if options.method != self.method:
            raise MergeqError(f"the {self.method} exporter was given {options.method} options")


register("gptq", GptqOptions, make=partial(Int4Exporter, "gptq"))
register("awq", AwqOptions, make=partial(Int4Exporter, "awq"))


@dataclass
class Plan:
    """Everything preflight decided: the exact scheme, the layout, the kernel prediction, warnings."""

    scheme: QuantScheme
    format_name: str
    prediction: dict
    warnings: list[str]
    choices: list[str]  # automatic choices, recorded in the report
    excluded: Exclusions  # the linears kept in fp16 (--exclude)


# ------------------------------------------------------------------------------------------------ preflight


def plan(model_dir: Path, options: Int4Options) -> Plan:
    config = read_model_config(model_dir)
    family = family_of(config)
    if options.method == "awq":
        require_awq(family)
    layers = int(config["num_hidden_layers"])
    shapes = kernels.linear_shapes(config)
    fmt = FORMATS[options.format_name]
    choices: list[str] = []
    warnings: list[str] = []

    if options.samples < 1 or options.seq_len < 2:
        raise MergeqError(
            f"--samples {options.samples} --seq-len {options.seq_len}: need at least 1 sample of 2 tokens"
        )
    if options.method != "rtn" and options.calib is not None and not split_column(options.calib)[0].is_file():
        raise MergeqError(f"calibration file {options.calib} not found", hint=f"pass --calib FILE ({FORMATS_HELP})")
    if options.method == "awq" and options.desc_act:
        raise MergeqError("--desc-act is a GPTQ option; AWQ checkpoints have no activation order")
    if options.desc_act and options.format_name == "compressed-tensors":
        raise MergeqError(
            "--desc-act with --format compressed-tensors: groups in activation order (actorder 'group') were "
            "removed from compressed-tensors, which now refuses such checkpoints",
            hint="drop --desc-act (the default --act-order static already quantizes columns in activation order, "
            "compressed-tensors' 'weight' order), or use --format native",
        )
    if options.method == "awq" and options.format == "native" and options.bits != 4:
        raise MergeqError(f"--bits {options.bits}: vLLM's AWQ kernels take 4-bit weights only", hint="use --bits 4")
    resolve_device(options.device)
    excluded = resolve(config, tuple(options.exclude))

    sym = options.sym if options.sym is not None else options.method != "awq"
    group = options.group_size
    if group is None:
        fits = [g for g in (128, 64, 32) if all(s.in_features % g == 0 for s in shapes)]
        group = fits[0] if fits else -1
        if group != 128:
            narrow = sorted({s.in_features for s in shapes if s.in_features % 128})
            choices.append(f"group size {group} chosen: 128 does not divide in_features {narrow}")
    scheme = fmt.adapt_scheme(QuantScheme(bits=options.bits, group_size=group, sym=sym))
    kernels.check_group_size(shapes, scheme, layers)
    kernels.check_packing(shapes, fmt.layout(scheme), layers, options.format_name)

    prediction = kernels.predict_kernels(config, options.format_name, scheme, options.desc_act)
    tp1 = prediction["tp"]["1"]
    if not tp1["ok"] and not prediction["refused"]:  # a refusal of the whole format is a warning below
        hint = (
            "use --sym, or the native format"
            if options.format == "compressed-tensors" and not sym
            else "choose a --group-size that divides every in_features, or another --format"
        )
        raise MergeqError("vLLM would refuse this checkpoint on one GPU: " + "; ".join(tp1["problems"]), hint=hint)
    for problem in tp1["problems"]:
        warnings.append(f"vLLM at TP 1: {problem}")
    if prediction["refused"]:
        warnings.append(f"vLLM will not load this checkpoint: {prediction['refused']} (transformers/GPTQModel do)")
    return Plan(
        scheme=scheme,
        format_name=options.format_name,
        prediction=prediction,
        warnings=warnings,
        choices=choices,
        excluded=excluded,
    )


# ------------------------------------------------------------------------------------------------- export


class FormatSink:
    """Turns the engine's output into a format's tensors in a ShardWriter, counting bytes as it goes."""

    def __init__(self, fmt, writer: ShardWriter, scheme: QuantScheme, desc_act: bool):
        self.fmt = fmt
        self.writer = writer
        self.scheme = scheme
        self.desc_act = desc_act
        self.quantized_linears = 0
        self.quantized_params = 0
        self.quantized_bytes = 0
        self.plain_tensors = 0

    def linear(self, name: str, quantized: QuantizedLinear) -> None:
        tensors = self.fmt.linear_tensors(name, quantized, self.scheme, self.desc_act)
        for tensor_name, tensor in tensors.items():
            self.writer.add(tensor_name, tensor)
            if not tensor_name.endswith(".bias"):
                self.quantized_bytes += tensor.numel() * tensor.element_size()
        self.quantized_linears += 1
        self.quantized_params += quantized.codes.numel()

    def tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(name, tensor)
        self.plain_tensors += 1

    def tensor_parts(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], parts) -> None:
        self.writer.add_parts(name, dtype, shape, parts)
        self.plain_tensors += 1


def _replaceable(out_dir: Path) -> bool:
    if not out_dir.exists():
        return True
    if not out_dir.is_dir():
        return False
    if not any(out_dir.iterdir()):
        return True
    try:
        config = json.loads((out_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "quantization_config" in config


def export_int4(model_dir: Path, out_dir: Path, options: Int4Options) -> ArtifactReport:
    """Calibrate -> quantize (streamed, layer by layer, into shards) -> write the config -> report."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    the_plan = plan(model_dir, options)
    _check_output(model_dir, out_dir)
    reset_peak_rss()  # the report's peak is this export's, not the process's since it started
    started = time.perf_counter()
    calibration = calibrate(model_dir, options)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        result, sink = quantize(model_dir, out_dir, tmp, options, the_plan, calibration)
        copied = write(model_dir, tmp, options, the_plan)
        size_bytes = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    seconds = time.perf_counter() - started
    return report(model_dir, out_dir, options, the_plan, calibration, result, sink, copied, size_bytes, seconds)


def _check_output(model_dir: Path, out_dir: Path) -> None:
    if not _replaceable(out_dir):
        raise MergeqError(
            f"{out_dir} exists and is not an int4 checkpoint written by mergeq",
            hint="choose another --out or remove it",
        )
    if model_dir.resolve() == out_dir.resolve():
        raise MergeqError("--out must differ from --model")


def calibrate(model_dir: Path, options: Int4Options) -> Calibration | None:
    """The calibration samples, tokenized by the model's tokenizer (None for RTN, which needs none)."""
    if options.method == "rtn":
        return None
    if options.calib is None:
        raise MergeqError(
            f"no calibration text given ({FORMATS_HELP})",
            hint="pass --calib FILE (or `calib` in the config): text like what the model will see "
            "in use; `demo` names the demo's calibration text",
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return load_calibration(options.calib, tokenizer, options.samples, options.seq_len)


def quantize(
    model_dir: Path, out_dir: Path, tmp: Path, options: Int4Options, the_plan: Plan, calibration: Calibration | None
) -> tuple[StreamResult, FormatSink]:
    """Every decoder layer quantized in turn, its tensors written to shards under tmp in the plan's format
    (each finished layer also saved beside out_dir, so a killed export resumes at the next layer)."""
    engine = EngineOptions(given=options, scheme=the_plan.scheme, exclude=the_plan.excluded.engine_patterns())
    writer = ShardWriter(tmp, max_shard_bytes=SHARD_BYTES)
    sink = FormatSink(FORMATS[the_plan.format_name], writer, the_plan.scheme, options.desc_act)
    tokens = None if calibration is None else calibration.tokens
    result = quantize_streaming(
        model_dir, tokens, engine, sink, checkpoints=layer_checkpoints(model_dir, out_dir, tokens, engine)
    )
    writer.finish()
    return result, sink


def layer_checkpoints(model_dir: Path, out_dir: Path, tokens, engine: EngineOptions) -> LayerCheckpoints:
    """Where each finished decoder layer is saved, so a killed export resumes at the next layer. The folder sits
    beside the output and is named by the inputs' key, not by the output's (temporary) name: the pipeline's
    stage writes into a new temporary folder on every attempt. It is removed when the export finishes."""
    device = str(resolve_device(engine.given.device))  # as run ("auto" is whatever this machine has)
    key = inputs_key(model_dir, tokens, {"engine": asdict(engine), "version": VERSION, "device": device})
    return LayerCheckpoints(
        Path(out_dir).parent / f".mergeq-int4-resume-{key[:20]}",
        key,
        int(read_model_config(model_dir)["num_hidden_layers"]),
    )


def write(model_dir: Path, tmp: Path, options: Int4Options, the_plan: Plan) -> list[str]:
    """config.json with the quantization config, the format's side files, the tokenizer and other small files."""
    fmt = FORMATS[the_plan.format_name]
    qconfig = fmt.quantization_config(
        the_plan.scheme, options.desc_act, options.damp_percent if options.method == "gptq" else None, the_plan.excluded
    )
    out_config = dict(read_model_config(model_dir))
    out_config["quantization_config"] = qconfig
    out_config["dtype"] = "float16"
    if "torch_dtype" in out_config:
        out_config["torch_dtype"] = "float16"
    write_json(tmp / "config.json", out_config)
    for name, content in fmt.side_files(qconfig).items():
        write_json(tmp / name, content)
    return copy_aux_files([model_dir], tmp)


def report(
    model_dir: Path,
    out_dir: Path,
    options: Int4Options,
    the_plan: Plan,
    calibration: Calibration | None,
    result: StreamResult,
    sink: FormatSink,
    copied: list[str],
    size_bytes: int,
    seconds: float,
) -> ArtifactReport:
    source = TensorSource(model_dir)
    total_params = sum(_numel(source.shape(n)) for n in source.names())
    source.close()
    size = SizeInfo(
        size_bytes=size_bytes,
        fp16_bytes=2 * total_params,
        bits_per_weight=8 * size_bytes / total_params,
        bits_per_quantized_weight=8 * sink.quantized_bytes / max(sink.quantized_params, 1),
        tensor_types={f"int{the_plan.scheme.bits}-packed": sink.quantized_linears, "F16": sink.plain_tensors},
    )
    extra = {
        "method": options.method,
        "checkpoint_format": the_plan.format_name,
        "bits": the_plan.scheme.bits,
        "group_size": the_plan.scheme.group_size,
        "sym": the_plan.scheme.sym,
        "desc_act": options.desc_act,
        "vllm_method": the_plan.prediction["method"],
        "vllm_kernel_by_tp": kernels.summarize(the_plan.prediction),
        "vllm_prediction": the_plan.prediction,
        "vllm_serve": kernels.serve_command(out_dir, the_plan.format_name),
        "device": str(resolve_device(options.device)),
        "automatic_choices": the_plan.choices,
        "excluded_linears": list(the_plan.excluded.names),  # kept in fp16 by --exclude
        "copied_files": copied,
        "quantize_seconds": round(result.seconds, 3),
    }
    if options.method == "gptq":
        extra["damp_percent"] = options.damp_percent
        extra["act_order"] = "dynamic" if options.desc_act else options.act_order
    if options.method == "awq":
        alphas = [a for info in result.layer_info for a in info.get("alpha", {}).values() if a is not None]
        extra["awq_mean_alpha"] = round(sum(alphas) / len(alphas), 4) if alphas else None
    if calibration is not None:
        extra.update(calibration.describe())
    warnings = (
        list(the_plan.warnings) + (calibration.warnings if calibration else []) + the_plan.choices + result.warnings
    )
    return ArtifactReport(
        format=options.method if options.method != "rtn" else "gptq",
        quant=the_plan.scheme.label,
        path=str(out_dir),
        size=size,
        stages={"quantize": StageCost(seconds=seconds, peak_rss_bytes=peak_rss_bytes())},
        provenance={
            "model": str(model_dir),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
            **package_versions(("torch", "transformers"), missing="unknown"),
            "python": platform.python_version(),
            **({"calib_sha256": calibration.sha256} if calibration else {}),
        },
        warnings=warnings,
        extra=extra,
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
