"""How Mixture-of-Experts families store their experts on disk, as data, and the stacking that turns the
per-expert tensors of a checkpoint into the fused parameters transformers 5 builds in memory.

transformers 5 keeps a layer's experts as one module with two 3-D parameters, gate_up_proj [E, 2I, H] and
down_proj [E, H, I]; checkpoints (and vLLM) keep one 2-D tensor per expert and projection:
`{disk}.{e}.{gate|up|down}.weight`. Used wherever a decoder layer is filled from the files
(mergeq/core/skeleton.py: the int4 engine, streamed evaluation and merge validation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mergeq.core.errors import MergeqError


@dataclass(frozen=True)
class ExpertLayout:
    """A fused experts module (gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn) and the per-expert linears
    the checkpoint uses: `{disk}.{e}.{gate|up|down}.weight`."""

    module: str  # the experts module inside a decoder layer, e.g. "mlp.experts"
    disk: str  # its prefix on disk, e.g. "mlp.experts" or "block_sparse_moe.experts"
    gate: str
    up: str
    down: str
    renames: tuple[tuple[str, str], ...] = ()  # (disk prefix, module prefix) for the layer's other tensors

    @property
    def parts(self) -> dict[str, tuple[str, ...]]:
        """Each fused parameter -> the per-expert tensors it concatenates along its rows, in order."""
        return {"gate_up_proj": (self.gate, self.up), "down_proj": (self.down,)}

    def to_module(self, name: str) -> str:
        for disk, module in self.renames:
            if name.startswith(disk):
                return module + name[len(disk) :]
        return name

    def to_disk(self, name: str) -> str:
        for disk, module in self.renames:
            if name.startswith(module):
                return disk + name[len(module) :]
        return name


# by config.json architecture (gate and up concatenated along the rows, as transformers' conversion mapping does)
EXPERT_LAYOUTS: dict[str, ExpertLayout] = {
    "MixtralForCausalLM": ExpertLayout(
        "mlp.experts", "block_sparse_moe.experts", "w1", "w3", "w2", renames=(("block_sparse_moe.", "mlp."),)
    ),
    "Qwen3MoeForCausalLM": ExpertLayout("mlp.experts", "mlp.experts", "gate_proj", "up_proj", "down_proj"),
}
# config.json keys that give a model's expert count
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def expert_layout_of(config: dict) -> ExpertLayout | None:
    """The layout for config.json's architecture; None for a family without one (dense, or not known)."""
    for name in config.get("architectures") or []:
        if name in EXPERT_LAYOUTS:
            return EXPERT_LAYOUTS[name]
    return None


def has_experts(config: dict) -> bool:
    """Whether config.json describes a Mixture-of-Experts model."""
    return any(int(config.get(key) or 0) > 0 for key in EXPERT_COUNT_KEYS)


def stored_per_expert(state: dict) -> bool:
    return any(".experts.0." in name for name in state)


def stack_experts(state: dict[str, torch.Tensor], layout: ExpertLayout, prefix: str) -> dict[str, torch.Tensor]:
    """One layer's state dict (names relative to the layer): per-expert gate/up/down weights -> the fused
    gate_up_proj [E, 2I, H] and down_proj [E, H, I]; the other tensors renamed to their module names."""
    disk = layout.disk + "."
    per_expert: dict[int, dict[str, torch.Tensor]] = {}
    out = {}
    for name, tensor in state.items():
        if name.startswith(disk):
            index, _, rest = name[len(disk) :].partition(".")
            per_expert.setdefault(int(index), {})[rest] = tensor
        else:
            out[layout.to_module(name)] = tensor
    if not per_expert:
        raise MergeqError(f"{prefix}{layout.disk}.*: no expert tensors found")
    count = max(per_expert) + 1
    gate_up, down = [], []
    for e in range(count):
        parts = per_expert.get(e, {})
        try:
            gate_up.append(torch.cat([parts[f"{layout.gate}.weight"], parts[f"{layout.up}.weight"]], dim=0))
            down.append(parts[f"{layout.down}.weight"])
        except KeyError as exc:
            raise MergeqError(f"{prefix}{layout.disk}.{e}: missing {exc.args[0]}") from None
    out[f"{layout.module}.gate_up_proj"] = torch.stack(gate_up)
    out[f"{layout.module}.down_proj"] = torch.stack(down)
    return out


_LAYER = re.compile(r"^(.*\.layers\.\d+\.)")


def module_state_dict(state: dict[str, torch.Tensor], layout: ExpertLayout | None) -> dict[str, torch.Tensor]:
    """A whole model's state dict with checkpoint names -> transformers' module names (the per-expert tensors
    stacked into each layer's fused experts parameters); unchanged without an expert layout."""
    if layout is None:
        return state
    layers: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for name, tensor in state.items():
        match = _LAYER.match(name)
        if match:
            layers.setdefault(match.group(1), {})[name[match.end(1) :]] = tensor
        else:
            out[name] = tensor
    for prefix, layer_state in layers.items():
        out |= {prefix + n: t for n, t in stack_experts(layer_state, layout, prefix).items()}
    return out
