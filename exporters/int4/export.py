"""What the gptq and awq exporters share: options, preflight, the streamed export and its report."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from exporters.int4 import kernels
from exporters.int4.arch import architecture_of
from exporters.int4.calibration import Calibration, load_calibration
from exporters.int4.checkpoint import ShardWriter, TensorSource, copy_auxiliary_files, read_config
from exporters.int4.formats import FORMATS
from exporters.int4.layerwise import EngineOptions, quantize_streaming, resolve_device
from exporters.int4.quant import QuantizedLinear, QuantScheme
from exporters.int4.resume import LayerCheckpoints, inputs_key
from exporters.report import ArtifactReport, SizeInfo, StageCost
from mergeq.core import VERSION
from mergeq.core.atomic import atomic_dir, write_json
from mergeq.core.errors import MergeqError
from mergeq.core.memory import peak_rss_bytes, reset_peak_rss
from mergeq.core.texts import FORMATS_HELP, split_column

log = logging.getLogger(__name__)

FORMAT_CHOICES = ("native", "compressed-tensors")


@dataclass
class Int4Options:
    method: str  # "gptq", "awq" (or "rtn", the baseline)
    bits: int = 4
    group_size: int | None = None  # None: 128 if it divides every in_features, else 64, else 32
    sym: bool | None = None  # None: the method's default (GPTQ symmetric, AWQ asymmetric)
    desc_act: bool = False
    format: str = "native"  # "native" (the method's own layout) or "compressed-tensors"
    calib: Path | None = None  # calibration text (mergeq.core.texts formats); required except for RTN
    samples: int = 128
    seq_len: int = 512
    device: str = "auto"
    damp_percent: float = 0.01
    act_order: str = "static"  # GPTQ without --desc-act: "static" (default) or "none"
    gptq_mse: bool = False
    max_shard_bytes: int = 1 << 30  # output buffered before a shard is written
    awq_sketch_rows: int = 128  # rows of the CountSketch AWQ measures output error against
    awq_duo: bool = False

    @property
    def format_name(self) -> str:
        if self.format == "compressed-tensors":
            return "compressed-tensors"
        return "awq" if self.method == "awq" else "gptq"


@dataclass
class Plan:
    """Everything preflight decided: the exact scheme, the layout, the kernel prediction, warnings."""

    scheme: QuantScheme
    format_name: str
    prediction: dict
    warnings: list[str]
    choices: list[str]  # automatic choices, recorded in the report


def add_int4_arguments(parser: argparse.ArgumentParser, *, method: str, samples: int, seq_len: int) -> None:
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8) if method == "gptq" else (4,),
                        help="weight bits (default 4)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="input columns per scale (default: 128 if it divides every layer, else 64 or 32; -1: per channel)")
    symmetry = parser.add_mutually_exclusive_group()
    symmetry.add_argument("--sym", dest="sym", action="store_true", default=None,
                          help="symmetric codes, no zero points" + (" (default; vLLM's Marlin needs it)" if method == "gptq" else ""))
    symmetry.add_argument("--asym", dest="sym", action="store_false",
                          help="asymmetric codes with zero points" + (" (default)" if method == "awq" else ""))
    if method == "gptq":
        parser.add_argument("--desc-act", action="store_true",
                            help="GPTQ dynamic activation order: groups follow it (writes g_idx; Exllama cannot split it)")
        parser.add_argument("--act-order", choices=("static", "none"), default="static",
                            help="without --desc-act: process columns by activation order with fixed contiguous groups "
                                 "(static, default) or in plain order (none)")
        parser.add_argument("--damp-percent", type=float, default=0.01,
                            help="GPTQ dampening as a fraction of the mean Hessian diagonal (default 0.01)")
    parser.add_argument("--format", choices=FORMAT_CHOICES, default="native",
                        help=f"checkpoint layout: {method} (native, default) or compressed-tensors pack-quantized")
    parser.add_argument("--calib", type=Path, help="calibration text, required: .txt; .jsonl with a \"text\" field or chat "
                                                   "\"messages\" (rendered with the model's chat template); "
                                                   ".parquet:COLUMN; `demo` for the demo's text")
    parser.add_argument("--samples", type=int, default=samples, help=f"calibration samples (default {samples})")
    parser.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per calibration sample (default {seq_len})")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")


def options_from_args(args, method: str) -> Int4Options:
    return Int4Options(
        method=method,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        desc_act=getattr(args, "desc_act", False),
        format=args.format,
        calib=args.calib,
        samples=args.samples,
        seq_len=args.seq_len,
        device=args.device,
        damp_percent=getattr(args, "damp_percent", 0.01),
        act_order=getattr(args, "act_order", "static"),
    )


# ------------------------------------------------------------------------------------------------ preflight


def plan(model_dir: Path, options: Int4Options) -> Plan:
    config = read_config(model_dir)
    arch = architecture_of(config)
    layers = int(config["num_hidden_layers"])
    shapes = kernels.linear_shapes(config, arch)
    fmt = FORMATS[options.format_name]
    choices: list[str] = []
    warnings: list[str] = []

    if options.samples < 1 or options.seq_len < 2:
        raise MergeqError(f"--samples {options.samples} --seq-len {options.seq_len}: need at least 1 sample of 2 tokens")
    if options.method != "rtn" and options.calib is not None and not split_column(options.calib)[0].is_file():
        raise MergeqError(f"calibration file {options.calib} not found", hint=f"pass --calib FILE ({FORMATS_HELP})")
    if options.method == "awq" and options.desc_act:
        raise MergeqError("--desc-act is a GPTQ option; AWQ checkpoints have no activation order")
    if options.desc_act and options.format_name == "compressed-tensors":
        raise MergeqError(
            "--desc-act with --format compressed-tensors: groups in activation order (actorder 'group') were "
            "removed from compressed-tensors, which now refuses such checkpoints",
            hint="drop --desc-act (the default --act-order static already quantizes columns in activation order, "
                 "compressed-tensors' 'weight' order), or use --format native")
    if options.method == "awq" and options.format == "native" and options.bits != 4:
        raise MergeqError(f"--bits {options.bits}: vLLM's AWQ kernels take 4-bit weights only", hint="use --bits 4")
    resolve_device(options.device)

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

    prediction = kernels.predict_kernels(config, arch, options.format_name, scheme, options.desc_act)
    tp1 = prediction["tp"]["1"]
    if not tp1["ok"] and not prediction["refused"]:  # a refusal of the whole format is a warning below
        hint = "use --sym, or the native format" if options.format == "compressed-tensors" and not sym else \
            "choose a --group-size that divides every in_features, or another --format"
        raise MergeqError("vLLM would refuse this checkpoint on one GPU: " + "; ".join(tp1["problems"]), hint=hint)
    for problem in tp1["problems"]:
        warnings.append(f"vLLM at TP 1: {problem}")
    if prediction["refused"]:
        warnings.append(f"vLLM will not load this checkpoint: {prediction['refused']} (transformers/GPTQModel do)")
    return Plan(scheme=scheme, format_name=options.format_name, prediction=prediction, warnings=warnings,
                choices=choices)


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


def layer_checkpoints(model_dir: Path, out_dir: Path, tokens, engine: EngineOptions, config: dict) -> LayerCheckpoints:
    """Where each finished decoder layer is saved, so a killed export resumes at the next layer. The folder sits
    beside the output and is named by the inputs' key, not by the output's (temporary) name: the pipeline's
    stage writes into a new temporary folder on every attempt. It is removed when the export finishes."""
    key = inputs_key(model_dir, tokens, {"engine": asdict(engine), "version": VERSION})
    return LayerCheckpoints(Path(out_dir).parent / f".mergeq-int4-resume-{key[:20]}", key,
                            int(config["num_hidden_layers"]))


def export_int4(model_dir: Path, out_dir: Path, options: Int4Options) -> ArtifactReport:
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    the_plan = plan(model_dir, options)
    if options.method != "rtn" and options.calib is None:
        raise MergeqError(f"no calibration text given ({FORMATS_HELP})",
                          hint="pass --calib FILE (or `calib` in the config): text like what the model will see "
                               "in use; `demo` names the demo's calibration text")
    if not _replaceable(out_dir):
        raise MergeqError(f"{out_dir} exists and is not an int4 checkpoint written by mergeq",
                          hint="choose another --out or remove it")
    if model_dir.resolve() == out_dir.resolve():
        raise MergeqError("--out must differ from --model")
    reset_peak_rss()  # the report's peak is this export's, not the process's since it started
    started = time.perf_counter()
    fmt = FORMATS[the_plan.format_name]

    calibration: Calibration | None = None
    if options.method != "rtn":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        calibration = load_calibration(options.calib, tokenizer, options.samples, options.seq_len)

    engine = EngineOptions(method=options.method, scheme=the_plan.scheme, desc_act=options.desc_act,
                           act_order=options.act_order, gptq_mse=options.gptq_mse,
                           awq_sketch_rows=options.awq_sketch_rows, awq_duo=options.awq_duo,
                           damp_percent=options.damp_percent, device=options.device)
    config = read_config(model_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes=options.max_shard_bytes)
        sink = FormatSink(fmt, writer, the_plan.scheme, options.desc_act)
        tokens = None if calibration is None else calibration.tokens
        result = quantize_streaming(model_dir, tokens, engine, sink,
                                    checkpoints=layer_checkpoints(model_dir, out_dir, tokens, engine, config))
        writer.finish()
        qconfig = fmt.quantization_config(the_plan.scheme, options.desc_act,
                                          options.damp_percent if options.method == "gptq" else None)
        out_config = dict(config)
        out_config["quantization_config"] = qconfig
        out_config["dtype"] = "float16"
        if "torch_dtype" in out_config:
            out_config["torch_dtype"] = "float16"
        write_json(tmp / "config.json", out_config)
        for name, content in fmt.side_files(qconfig).items():
            write_json(tmp / name, content)
        copied = copy_auxiliary_files(model_dir, tmp)
        size_bytes = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    seconds = time.perf_counter() - started

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
    device = str(resolve_device(options.device))
    summary = kernels.summarize(the_plan.prediction)
    extra = {
        "method": options.method,
        "checkpoint_format": the_plan.format_name,
        "bits": the_plan.scheme.bits,
        "group_size": the_plan.scheme.group_size,
        "sym": the_plan.scheme.sym,
        "desc_act": options.desc_act,
        "vllm_method": the_plan.prediction["method"],
        "vllm_kernel_by_tp": summary,
        "vllm_prediction": the_plan.prediction,
        "vllm_serve": kernels.serve_command(out_dir, the_plan.format_name),
        "device": device,
        "automatic_choices": the_plan.choices,
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
    warnings = list(the_plan.warnings) + (calibration.warnings if calibration else []) + the_plan.choices
    return ArtifactReport(
        format=options.method if options.method != "rtn" else "gptq",
        quant=the_plan.scheme.label,
        path=str(out_dir),
        size=size,
        stages={"quantize": StageCost(seconds=seconds, peak_rss_bytes=peak_rss_bytes())},
        provenance={
            "model": str(model_dir),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
            "torch": torch.__version__,
            "transformers": _version("transformers"),
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


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
