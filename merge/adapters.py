"""PEFT adapter folders: config, tensors, and what each tensor does to which base module.

Supported: LoRA (`lora_alpha / r`), rsLoRA (`lora_alpha / sqrt(r)`), per-module `rank_pattern` and
`alpha_pattern`, DoRA magnitude vectors, `lora_bias`, LoRA on embeddings, GPT-2 style Conv1D
(`fan_in_fan_out`), `modules_to_save`, trainable token rows (`trainable_token_indices`), full embedding
layers saved with the adapter (resized vocabularies), and LoRA on parameters (`target_parameters`: 2-D weights,
and the fused expert tensors of MoE models, merge/experts.py). Every other PEFT type or LoRA variant is refused
with "not supported: <type>".

Tensors stay in the adapter file until the merge needs them (`Adapter.tensor`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge.experts import ExpertLora, wrapped_parameters
from mergeq.core.checkpoint import load_tensor_file
from mergeq.core.errors import MergeqError
from mergeq.core.modelfiles import read_json_object
from mergeq.core.safetensors_file import SafetensorsFile

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
KEY_PREFIX = "base_model.model."

# LoRA options that change what a merge means; any of them set -> refused, naming the option.
UNSUPPORTED_LORA_OPTIONS = {
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "aLoRA (activated LoRA)",
    "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "mica": "MiCA",
    "kasa_config": "KaSA",
    "layer_replication": "layer replication",
}
# Initialisations that rewrite the base weights: the saved adapter only fits that rewritten base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva")


@dataclass
class LoraModule:
    """One LoRA-adapted module of one adapter."""

    module: str
    kind: str  # "linear" or "embedding"
    r: int
    alpha: float
    scale: float
    a_key: str
    b_key: str
    bias_key: str | None = None
    magnitude_key: str | None = None

    @property
    def variant(self) -> str:
        return "dora" if self.magnitude_key else "lora"


@dataclass
class Replacement:
    """A full tensor carried by the adapter that replaces the base's (modules_to_save, saved embedding layers)."""

    tensor: str  # base tensor name, e.g. lm_head.weight
    key: str  # adapter tensor key
    source: str  # "modules_to_save" or "base_layer"


@dataclass
class TokenRows:
    """Trainable token rows: these rows of an embedding are replaced by the adapter's values."""

    module: str
    indices: list[int]
    key: str


@dataclass
class Adapter:
    path: Path
    weight: float
    name: str
    config: dict
    weights_file: Path
    loras: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, Replacement] = field(default_factory=dict)  # modules_to_save, by base tensor name
    base_layers: dict[str, Replacement] = field(default_factory=dict)  # saved (resized) base layers, by tensor
    tokens: dict[str, TokenRows] = field(default_factory=dict)  # by module name
    expert_loras: dict[str, ExpertLora] = field(default_factory=dict)  # target_parameters LoRA, by parameter
    _st: SafetensorsFile | None = None
    _bin: dict[str, torch.Tensor] | None = None

    @property
    def files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.is_file())

    def keys(self) -> list[str]:
        return self._st.keys() if self._st is not None else list(self._bin or {})

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return self._st.tensors[key].shape
        return tuple(self._bin[key].shape)

    def tensor(self, key: str) -> torch.Tensor:
        """The adapter tensor as a fresh fp32 tensor."""
        if self._st is not None:
            return self._st.get(key, torch.float32)
        return self._bin[key].to(torch.float32, copy=True)

    def check_finite(self) -> None:
        for key in self.keys():
            t = self.tensor(key)
            if t.numel() and not all(math.isfinite(float(x)) for x in torch.aminmax(t)):  # NaN/Inf survive
                bad = int((~torch.isfinite(t)).sum())
                raise MergeqError(
                    f"adapter {self.path}: tensor {key} has {bad} NaN or Inf value(s)",
                    hint="the adapter is broken (diverged training?); use an earlier checkpoint",
                )

    def close(self) -> None:
        if self._st is not None:
            self._st.close()


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern rule: the first key that matches the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: dict, module: str) -> tuple[int, float, float]:
    """(r, alpha, scale) for one module under this LoRA config."""
    r = int(pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    if r <= 0:
        raise MergeqError(f"adapter config gives module {module} rank r={r}; it must be positive")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, alpha, scale


def read_config(path: Path) -> dict:
    return read_json_object(
        Path(path) / CONFIG_NAME,
        hint="is this a PEFT adapter folder? pass the folder written by PeftModel.save_pretrained",
    )


def check_supported(path: Path, config: dict) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise MergeqError(
            f"adapter {path}: not supported: {peft_type or 'unknown'} (PEFT type from {CONFIG_NAME})",
            hint="mergeq merges LoRA adapters (plain, rsLoRA, DoRA, with rank/alpha patterns)",
        )
    for option, label in UNSUPPORTED_LORA_OPTIONS.items():
        if config.get(option):
            raise MergeqError(
                f"adapter {path}: not supported: {label} (option {option!r} is set)",
                hint="only plain LoRA, rsLoRA and DoRA adapters can be merged by mergeq",
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise MergeqError(
            f"adapter {path}: not supported: LoRA initialised with {init!r}, which rewrites the base weights",
            hint="convert it to a plain LoRA first: PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)",
        )


def _strip(key: str) -> str:
    return key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key


def _token_indices(config: dict, module: str, input_embedding: str | None) -> list[int] | None:
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return [int(i) for i in spec]
    if isinstance(spec, dict):
        for name, indices in spec.items():
            if module == name or module.endswith("." + name):
                return [int(i) for i in indices]
    return None


def _is_modules_to_save(config: dict, module: str) -> bool:
    for target in config.get("modules_to_save") or []:
        if module == target or module.endswith("." + target):
            return True
    return False


def load_adapter(path: Path, weight: float, index: int, input_embedding: str | None = None) -> Adapter:
    """Parse one adapter folder; raises MergeqError for anything it cannot merge exactly."""
    path = Path(path)
    if not path.is_dir():
        raise MergeqError(f"adapter {path} does not exist or is not a folder")
    config = read_config(path)
    check_supported(path, config)
    weights_file = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
    if weights_file is None:
        raise MergeqError(f"adapter {path}: no adapter_model.safetensors or adapter_model.bin")
    if not math.isfinite(weight):
        raise MergeqError(f"adapter {path}: weight {weight} is not a finite number")
    adapter = Adapter(path=path, weight=float(weight), name=f"adapter{index}", config=config, weights_file=weights_file)
    if weights_file.suffix == ".safetensors":
        adapter._st = SafetensorsFile(weights_file)
    else:
        adapter._bin = load_tensor_file(weights_file)
    _classify(adapter, input_embedding)
    return adapter


def _classify(adapter: Adapter, input_embedding: str | None) -> None:
    config = adapter.config
    parts: dict[str, dict[str, str]] = {}
    for key in adapter.keys():
        name = _strip(key)
        for suffix, role in (
            (".lora_A.weight", "A"),
            (".lora_B.weight", "B"),
            (".lora_B.bias", "bias"),
            (".lora_embedding_A", "embA"),
            (".lora_embedding_B", "embB"),
            (".lora_magnitude_vector.weight", "m"),
            (".lora_magnitude_vector", "m"),
            (".token_adapter.trainable_tokens_delta", "tokens"),
            (".token_adapter.base_layer.weight", "base.weight"),
            (".base_layer.weight", "base.weight"),
            (".base_layer.bias", "base.bias"),
            (".original_module.weight", "base.weight"),
            (".original_module.bias", "base.bias"),
            (".modules_to_save.weight", "mts.weight"),
            (".modules_to_save.bias", "mts.bias"),
        ):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[role] = key
                break
        else:
            module, _, param = name.rpartition(".")
            if param in ("weight", "bias") and _is_modules_to_save(config, module):
                adapter.replacements[name] = Replacement(name, key, "modules_to_save")
            elif ".lora_" in name or "lora_" in param:
                raise MergeqError(f"adapter {adapter.path}: not supported: adapter tensor {key} (an unknown LoRA part)")
            else:
                raise MergeqError(
                    f"adapter {adapter.path}: tensor {key} is neither a LoRA part nor listed in modules_to_save",
                    hint="the adapter config and weights do not belong together",
                )
    wrappers: dict[str, int] = {}
    for module, roles in parts.items():
        if "A" in roles:
            owner = module
            while owner.endswith(".base_layer"):
                owner = owner[: -len(".base_layer")]
            wrappers[owner] = wrappers.get(owner, 0) + 1
    wrapped = wrapped_parameters(config, wrappers, adapter.path) if config.get("target_parameters") else {}
    for module, roles in parts.items():
        if module in wrapped and not (wrapped[module][1] == "weight" and module == wrapped[module][0]):
            _add_expert_lora(adapter, module, roles, *wrapped[module])
            continue
        for param in ("weight", "bias"):  # the wrapper's own copy, saved next to the plain key with embedding layers
            tensor = f"{module}.{param}"
            if f"mts.{param}" in roles and tensor not in adapter.replacements:
                adapter.replacements[tensor] = Replacement(tensor, roles[f"mts.{param}"], "modules_to_save")
        for param in ("weight", "bias"):
            if f"base.{param}" in roles:
                tensor = f"{module}.{param}"
                adapter.base_layers[tensor] = Replacement(tensor, roles[f"base.{param}"], "base_layer")
        if "tokens" in roles:
            indices = _token_indices(config, module, input_embedding)
            if indices is None:
                raise MergeqError(
                    f"adapter {adapter.path}: trainable token rows for {module} but no matching "
                    "trainable_token_indices in the config"
                )
            rows = adapter.shape(roles["tokens"])[0]
            if rows != len(indices):
                raise MergeqError(
                    f"adapter {adapter.path}: {module} has {rows} trainable token rows but the "
                    f"config lists {len(indices)} indices"
                )
            adapter.tokens[module] = TokenRows(module, indices, roles["tokens"])
        linear = "A" in roles or "B" in roles
        embedding = "embA" in roles or "embB" in roles
        if not (linear or embedding):
            if "m" in roles or "bias" in roles:
                raise MergeqError(f"adapter {adapter.path}: {module} has DoRA/bias tensors but no lora_A/lora_B")
            continue
        a_key = roles.get("A") or roles.get("embA")
        b_key = roles.get("B") or roles.get("embB")
        if a_key is None or b_key is None:
            raise MergeqError(f"adapter {adapter.path}: {module} has only one of lora_A / lora_B")
        a_shape, b_shape = adapter.shape(a_key), adapter.shape(b_key)
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise MergeqError(
                f"adapter {adapter.path}: not supported: LoRA on a convolution layer ({module}, "
                f"lora_A shape {list(a_shape)})"
            )
        r, alpha, scale = module_scale(config, module)
        kind = "embedding" if embedding else "linear"
        rank_a = a_shape[0]
        rank_b = b_shape[1]
        if rank_a != r or rank_b != r:
            raise MergeqError(
                f"adapter {adapter.path}: {module} has rank {rank_a} (lora_A) / {rank_b} (lora_B) but the config "
                f"gives r={r}",
                hint="check r and rank_pattern in adapter_config.json",
            )
        adapter.loras[module] = LoraModule(
            module, kind, r, alpha, scale, a_key, b_key, bias_key=roles.get("bias"), magnitude_key=roles.get("m")
        )


def _add_expert_lora(adapter: Adapter, module: str, roles: dict[str, str], owner: str, parameter: str) -> None:
    """A ParamWrapper's lora_A (experts*r, in) and lora_B (out, r*experts) on the parameter `owner.parameter`."""
    name = f"{owner}.{parameter}"
    if set(roles) - {"A", "B"}:
        raise MergeqError(
            f"adapter {adapter.path}: not supported: DoRA or lora_bias on the parameter {name} (target_parameters)"
        )
    if "B" not in roles:
        raise MergeqError(f"adapter {adapter.path}: {name} has lora_A but no lora_B")
    config = adapter.config
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise MergeqError(
            f"adapter {adapter.path}: not supported: rank_pattern/alpha_pattern together with "
            f"target_parameters ({name})"
        )
    r, _, scale = module_scale(config, owner)
    a_rows = adapter.shape(roles["A"])[0]
    b_shape = adapter.shape(roles["B"])
    if a_rows % r or b_shape[1] != a_rows:
        raise MergeqError(
            f"adapter {adapter.path}: {name} has lora_A rows {a_rows} and lora_B columns "
            f"{b_shape[1]}, not the same multiple of r={r}"
        )
    adapter.expert_loras[name] = ExpertLora(
        owner, parameter, r, scale, a_rows // r, adapter.shape(roles["A"])[1], b_shape[0], roles["A"], roles["B"]
    )


def describe_adapter(adapter: Adapter) -> dict:
    """Manifest entry: where it came from, what it is, and the scale applied to every module."""
    variants = sorted({m.variant for m in adapter.loras.values()})
    return {
        "path": str(adapter.path),
        "weight": adapter.weight,
        "config": adapter.config,
        "variants": variants,
        "modules_to_save": sorted(adapter.replacements),
        "saved_base_layers": sorted(adapter.base_layers),
        "trainable_tokens": {m: t.indices for m, t in sorted(adapter.tokens.items())},
        "scales": {m.module: m.scale for m in sorted(adapter.loras.values(), key=lambda m: m.module)},
        "applied_scales": {
            m.module: m.scale * adapter.weight for m in sorted(adapter.loras.values(), key=lambda m: m.module)
        },
        **(
            {"parameter_scales": {name: e.scale * adapter.weight for name, e in sorted(adapter.expert_loras.items())}}
            if adapter.expert_loras
            else {}
        ),
    }
