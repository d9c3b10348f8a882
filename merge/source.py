"""One base checkpoint (plain, bitsandbytes 4-bit, or requantized on the fly) opened with the adapters planned
against it (merge/plan.py), and the merge math for one tensor.

Several adapters are combined by task arithmetic: out = W + sum_i weight_i * (merge_i(W) - W), where
merge_i(W) is exactly what PEFT's merge_and_unload would give for adapter i alone: its operations
(merge/ops.py) applied in order, in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merge.adapters import Adapter, load_adapter
from merge.model_info import ModelInfo, describe
from merge.ops import Operation
from merge.plan import plan_merge
from merge.qlora import (
    QuantSettings,
    check_quantization_config,
    dequantize,
    quantize_dequantize,
    quantized_shape,
    quantized_weights,
    read_state,
)
from mergeq.core.checkpoint import Checkpoint
from mergeq.core.errors import MergeqError
from mergeq.core.modelfiles import read_json_object, read_model_config


class Source:
    """A base checkpoint with the adapters planned against it: `ops`, `base_layers`, `out_shapes` (the plan)."""

    def __init__(
        self,
        folder: Path,
        label: str,
        adapters_refs: list,
        out_dtype: torch.dtype,
        requantize: QuantSettings | None = None,
    ):
        self.folder = Path(folder)
        self.label = label
        self.out_dtype = out_dtype
        self.requantize = requantize
        self.config = read_model_config(self.folder)
        self.kind = check_quantization_config(self.config, self.folder) or "plain"
        self.ckpt = Checkpoint(self.folder)
        self.quant = quantized_weights(self.ckpt.names())
        if self.quant and self.kind == "plain":
            self.kind = "bnb-4bit"
        if self.kind == "bnb-4bit" and not self.quant:
            raise MergeqError(
                f"{self.folder}: config.json has a bitsandbytes quantization_config but no tensor "
                "carries a 4-bit quant state",
                hint="re-save the 4-bit checkpoint with transformers",
            )
        self.aux = {
            f"{w}.{s}" for w in self.quant for s in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
        } | set(self.quant.values())
        for weight, state_key in self.quant.items():  # every quant state is validated before any output
            read_state(self.ckpt, weight, state_key)
        self.base_names = [n for n in self.ckpt.names() if n not in self.aux]
        self.info: ModelInfo = describe(self.config, self.base_names)
        self.shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name in self.base_names:
            self.shapes[name] = (
                quantized_shape(self.ckpt, self.quant[name]) if name in self.quant else self.ckpt.info(name)
            )
        self.adapters = [
            load_adapter(ref.path, ref.weight, i, self.info.input_embedding) for i, ref in enumerate(adapters_refs)
        ]
        for adapter in self.adapters:
            _check_architecture(adapter, self.config, self.folder)
        self.requantized: set[str] = set()
        if requantize is not None:
            if self.kind != "plain":
                raise MergeqError(f"{self.folder} is already quantized; --requantize needs an fp16/bf16 base")
            self.requantized = {
                f"{m}.weight"
                for m, k in self.info.kinds.items()
                if k in ("linear", "conv1d")
                and f"{m}.weight" in self.shapes
                and not any(f"{m}.".startswith(f"{x}.") or f".{x}." in f".{m}." for x in self.info.not_quantized)
            }
        self.warnings: list[str] = []
        plan = plan_merge(self)
        self.ops = plan.ops
        self.base_layers = plan.base_layers
        self.out_shapes = plan.out_shapes
        self.virtual_head = plan.virtual_head

    # -- names
    @property
    def in_w(self) -> str | None:
        return f"{self.info.input_embedding}.weight" if self.info.input_embedding else None

    @property
    def out_w(self) -> str | None:
        return f"{self.info.output_embedding}.weight" if self.info.output_embedding else None

    # -- how each tensor is produced

    def plain_lora(self, name: str) -> bool:
        """Only plain LoRA products change this 2-D base tensor: it can be merged block of rows by block."""
        ops = self.ops.get(name)
        return (
            bool(ops)
            and name not in self.base_layers
            and name not in self.quant
            and name not in self.requantized
            and name in self.shapes
            and len(self.shapes[name][1]) == 2
            and not (self.info.tied and name in (self.in_w, self.out_w))
            and all(op.blockwise for _, op in ops)
        )

    def untouched(self, name: str) -> bool:
        """Copied through as it is (only cast): no adapter, quantization or tied-embedding logic involved."""
        return (
            name not in self.ops
            and name not in self.base_layers
            and name not in self.quant
            and name not in self.requantized
            and name in self.shapes
            and not (self.info.tied and name in (self.in_w, self.out_w))
        )

    def base_tensor(self, name: str) -> torch.Tensor:
        """The base's value of one tensor, as a fresh fp32 tensor (dequantized / resized as needed)."""
        if name in self.base_layers:
            adapter, rep = self.base_layers[name]
            tensor = adapter.tensor(rep.key)
            self._check_saved_base(name, tensor, adapter)
            return tensor
        if name == self.out_w and self.virtual_head:
            return self.base_tensor(self.in_w)
        if name in self.quant:
            return dequantize(self.ckpt, name, self.quant[name]).to(torch.float32)
        if name in self.requantized:
            original = self.ckpt.get(name)
            return quantize_dequantize(original, self.requantize).to(torch.float32)
        return self.ckpt.get(name, torch.float32)

    def _check_saved_base(self, name: str, saved: torch.Tensor, adapter: Adapter) -> None:
        real = name if name in self.shapes else self.in_w
        if real in self.quant:
            return
        base = self.ckpt.get(real, torch.float32)
        rows = base.shape[0]
        scale = float(base.abs().max()) + 1e-6
        diff = float((saved[:rows] - base).abs().max())
        if diff > 0.05 * scale:
            raise MergeqError(
                f"adapter {adapter.path} was saved from another base: its {name} differs from {real} in "
                f"{self.folder} by up to {diff:.4g}",
                hint="pass the base model the adapter was trained on",
            )

    def compute(self, name: str) -> torch.Tensor:
        """The merged fp32 value of one output tensor."""
        base = self.base_tensor(name)
        ops = self.ops.get(name, [])
        if not ops:
            return base
        by_adapter: dict[int, list[Operation]] = {}
        owners: dict[int, Adapter] = {}
        for adapter, op in ops:
            by_adapter.setdefault(id(adapter), []).append(op)
            owners[id(adapter)] = adapter
        if len(by_adapter) == 1:
            ((key, adapter_ops),) = by_adapter.items()
            adapter = owners[key]
            merged = merge_one(adapter, adapter_ops, base)
            if adapter.weight == 1.0:
                return merged
            if merged.shape != base.shape:
                raise MergeqError(f"cannot weight adapter {adapter.path}: it resizes {name}")
            merged.sub_(base).mul_(adapter.weight).add_(base)
            return merged
        acc = base.clone()
        for key, adapter_ops in by_adapter.items():
            adapter = owners[key]
            merged = merge_one(adapter, adapter_ops, base)
            if merged.shape != base.shape:
                raise MergeqError(f"adapters disagree on the shape of {name}; merge them separately")
            merged.sub_(base)
            acc.add_(merged, alpha=adapter.weight)
            del merged
        return acc

    def close(self) -> None:
        self.ckpt.close()
        for adapter in self.adapters:
            adapter.close()


def merge_one(adapter: Adapter, ops: list[Operation], base: torch.Tensor) -> torch.Tensor:
    """One adapter's `ops` applied to `base` exactly as PEFT's merge would (fp32); `base` is not modified."""
    current = base
    for op in ops:
        current = op.apply(adapter, current, base)
    return current if current is not base else base.clone()


def _check_architecture(adapter: Adapter, base_config: dict, folder: Path) -> None:
    """Refuse an adapter whose recorded base (a local folder with a config.json) is another architecture than
    `folder`: the shapes may agree (Llama and Mistral do) while the merged model would be wrong."""
    recorded = adapter.config.get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded or not Path(recorded).is_absolute():
        return
    try:
        trained = read_json_object(Path(recorded) / "config.json")
    except MergeqError:
        return  # a hub id or a folder that is gone: nothing to compare with

    def describe_arch(cfg: dict) -> tuple[str | None, str | None]:
        arches = cfg.get("architectures") or [None]
        return (arches[0] if isinstance(arches, list) and arches else None), cfg.get("model_type")

    (t_arch, t_type), (b_arch, b_type) = describe_arch(trained), describe_arch(base_config)
    if (t_arch and b_arch and t_arch != b_arch) or (t_type and b_type and t_type != b_type):
        raise MergeqError(
            f"adapter {adapter.path} was trained on {recorded} ({t_arch}, model_type {t_type}), but the base "
            f"{folder} is {b_arch} (model_type {b_type}) (from their config.json files): the tensor shapes may "
            "agree, the models do not",
            hint="pass the base the adapter was trained on",
        )
