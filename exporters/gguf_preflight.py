"""What the `gguf` exporter checks before any work, and the model facts it reads for that: the architecture the
pinned converter routes on (and the layer layout llama.cpp assumes for it), weights, tokenizer, chat template,
calibration text, and free disk for the intermediate and every planned file."""

from __future__ import annotations

import json
from pathlib import Path

from exporters.gguf_options import FLOAT_TYPES, GGUFOptions
from exporters.llamacpp.convert import supported_architectures
from exporters.llamacpp.pin import load_pin
from mergeq.core.errors import MergeqError
from mergeq.core.modelfiles import read_model_config
from mergeq.core.paths import free_bytes

DISK_MARGIN = 1.05  # planned bytes are estimates: ask for 5% more (plus 64 MiB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Upper bound of the size of a quantized file relative to f16: the mixtures and fallbacks never put a
# quantized tensor above Q8_0 (8.5 bits) unless a shape forces F16, which planned_bytes covers by 1.0.
QUANTIZED_BOUND = 8.5 / 16


def check_input(model_dir: Path, options: GGUFOptions) -> list[str]:
    """Everything checkable about the input before work: architecture, weights, tokenizer, calibration text and
    disk (where the model is; the export checks again where OUT is). Returns warnings about the input."""
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
    # the disk is checked where the files go, when that is known: GGUFExporter.export before any work, and a
    # pipeline's run for the stages it still has to run (mergeq.budget); not here, beside the input
    return warnings


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
    return "bf16" if "bfloat16" in _stored_dtype(config) else "f16"


def _stored_dtype(config: dict) -> str:
    """The weights' dtype as config.json names it (transformers writes `torch_dtype`, newer versions `dtype`)."""
    return str(config.get("torch_dtype") or config.get("dtype") or "float16")


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def f16_bytes_estimate(model_dir: Path, config: dict) -> int:
    """About what the model takes at 16 bits: its weight files, scaled by the stored element size."""
    total = sum(p.stat().st_size for p in weight_files(model_dir))
    return total // 2 if "float32" in _stored_dtype(config) else total


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
