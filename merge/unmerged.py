"""The unmerged model, one decoder layer at a time (mergeq/core/streaming.py): the base's tensors as the merge reads
them (UnmergedWeights) and PEFT's own unmerged adapter layers put into each decoder layer (with_adapters). The
reference that validation (merge/validate.py) and the QLoRA target choice (merge/target.py) compare merges with."""

from __future__ import annotations

import torch

from mergeq.core.errors import MergeqError


class UnmergedWeights:
    """The reference base's tensors for mergeq.core.streaming, in fp32 as the merge reads them (4-bit bases
    dequantized, `--requantize` applied); the adapters are not applied here (PEFT does that per layer)."""

    def __init__(self, source):
        self.source = source  # merge.source.Source
        self.folder = source.folder

    def names(self) -> list[str]:
        return list(self.source.shapes)

    def __contains__(self, name: str) -> bool:
        return name in self.source.shapes

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored when the base file holds it as it is (load_layer casts it), else the fp32 value."""
        if self._as_stored(name):
            return self.source.ckpt.get(name)
        return self.source.base_tensor(name)

    def stored_view(self, name: str):
        """A read-only view of the tensor in the base file, with the function releasing its pages; None when the
        file does not hold its value as it is (use `get`)."""
        return self.source.ckpt.view(name) if self._as_stored(name) else None

    def _as_stored(self, name: str) -> bool:
        """The base file holds this tensor's value as it is: not dequantized, requantized or replaced."""
        s = self.source
        return name in s.shapes and name not in s.quant and name not in s.requantized and name not in s.base_layers

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.source.shapes[name][1])

    def row_blocks(self, name: str):
        from mergeq.core.streaming import row_blocks

        s = self.source
        if self._as_stored(name) and name not in s.ops:
            yield from row_blocks(s.ckpt, name)  # stored as it is: read a block of rows at a time
        else:  # dequantized, requantized or replaced: one tensor, built whole
            yield 0, s.base_tensor(name)

    def close(self) -> None:
        """Unmap what was read (the stream calls this after each layer): the base's files and the adapters' (PEFT
        reads them layer by layer; pages mapped around each read piled up, 14 MB over 22 layers). Both reopen
        when read again."""
        self.source.close()


def with_adapters(source, prefix: str, layer: torch.nn.Module) -> torch.nn.Module:
    """PEFT's unmerged LoRA layers in the decoder layer whose tensors are named `prefix`* (e.g.
    "model.layers.3."), under the layer's full module path, with every adapter active and scaled by its weight."""
    import warnings

    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    if not any(name.startswith(prefix) for name in source.ops):
        return layer
    device = next(layer.parameters()).device
    root = torch.nn.Module()
    parent = root
    for part in prefix.rstrip(".").split(".")[:-1]:
        parent.add_module(part, torch.nn.Module())
        parent = getattr(parent, part)
    parent.add_module(prefix.rstrip(".").rsplit(".", 1)[-1], layer)
    names = []
    key_prefix = "base_model.model." + prefix
    for i, adapter in enumerate(source.adapters):
        keys = [k for k in adapter.keys() if k.startswith(key_prefix)]
        if not keys:
            continue
        name = f"a{i}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the adapter's parameters on the meta device (low_cpu_mem_usage): no random initialization (and no
            # DoRA norm over the base weight) of values the adapter file then replaces
            inject_adapter_in_model(
                PeftConfig.from_pretrained(str(adapter.path)), root, adapter_name=name, low_cpu_mem_usage=True
            )
            made = _adapter_in_fp32(root, device)
            state = {k[len("base_model.model.") :]: adapter.tensor(k) for k in keys}
            loaded = set_peft_model_state_dict(root, state, adapter_name=name)
        unset = sorted(made.intersection(loaded.missing_keys))
        if loaded.unexpected_keys or unset:
            what = f"place {loaded.unexpected_keys[:3]}" if loaded.unexpected_keys else f"find values for {unset[:3]}"
            raise MergeqError(
                f"validation: PEFT did not {what} of adapter {adapter.path} in decoder layer {prefix.rstrip('.')}",
                hint="pass --no-validate to merge without the check",
            )
        names.append((name, adapter.weight))
    for module in root.modules():
        if isinstance(module, LoraLayer):
            present = [n for n, _ in names if n in module.scaling]
            module.set_adapter(present)
            for n, weight in names:
                if n in module.scaling and weight != 1.0:
                    module.scaling[n] *= weight
    return layer.to(device).eval()


def _adapter_in_fp32(root: torch.nn.Module, device: torch.device) -> set[str]:
    """The adapters' parameters (lora_A, lora_B, DoRA magnitudes) that PEFT made on the meta device, allocated in
    fp32 on `device` (uninitialized: their values are loaded next). Returns their names."""
    made = set()
    for module_name, module in root.named_modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            if "lora_" in full and parameter.is_meta:
                empty = torch.empty(parameter.shape, dtype=torch.float32, device=device)
                setattr(module, name, torch.nn.Parameter(empty, requires_grad=parameter.requires_grad))
                made.add(full)
    return made
