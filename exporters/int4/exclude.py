"""Linears the user keeps in fp16 (`--exclude REGEX`, `exclude = [...]`): which ones, found up front from the
model's shapes, and how each format's quantization_config names them so that vLLM, transformers and
compressed-tensors load them unquantized.

A pattern is a regular expression searched in the full linear name as the checkpoint spells it
(`model.layers.0.mlp.down_proj`). It applies to the decoder layers' linears: lm_head, MoE routers and gates
stay in full precision anyway, and stacked MoE experts are quantized as one. vLLM fuses some linears of a
layer into one (VLLM_FUSED) and quantizes such a group all or nothing, so a pattern that keeps only part of
a group is refused up front."""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporters.int4.families import family_of, quantized_linears
from mergeq.core.errors import MergeqError

# vLLM's packed_modules_mapping for the decoder layers of the families mergeq quantizes: fused name -> members
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
HINT = (
    "a pattern is searched in full linear names such as model.layers.0.mlp.down_proj (Python re); lm_head and "
    "MoE routers stay in full precision without one"
)


@dataclass(frozen=True)
class Exclusions:
    """The full names (without `.weight`) of the linears kept in fp16, sorted."""

    names: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.names)

    def engine_patterns(self) -> tuple[str, ...]:
        """One anchored pattern per name, for the engine (exporters.int4.layerwise.EngineOptions.exclude)."""
        return tuple(f"^{re.escape(name)}$" for name in self.names)

    def with_fused_names(self) -> tuple[str, ...]:
        """The names plus the fused name of every group kept whole (`...self_attn.qkv_proj`): vLLM matches
        GPTQ's `dynamic` patterns against its own, fused, layer names."""
        kept = set(self.names)
        fused = set()
        for name in self.names:
            parent, _, leaf = name.rpartition(".")
            for group, members in VLLM_FUSED.items():
                if leaf in members and all(f"{parent}.{m}" in kept for m in members):
                    fused.add(f"{parent}.{group}")
        return tuple(sorted(kept | fused))


NONE_EXCLUDED = Exclusions()


def compile_patterns(patterns: tuple[str, ...]) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise MergeqError(f"--exclude '{pattern}' is not a regular expression: {exc}", hint=HINT) from exc
    return compiled


def resolve(config: dict, patterns: tuple[str, ...]) -> Exclusions:
    """The linears `patterns` keep in fp16, from a meta-device build of the model (no weights read). Refuses a
    pattern that matches none of the quantized linears, and a fused group kept in part."""
    if not patterns:
        return Exclusions()
    from exporters.int4.kernels import meta_model
    from mergeq.core.skeleton import decoder_layers

    compiled = compile_patterns(tuple(patterns))
    family = family_of(config)
    layers_name, layers = decoder_layers(meta_model(config))
    matched: set[str] = set()
    kept: list[str] = []
    for index, layer in enumerate(layers):
        prefix = f"{layers_name}.{index}."
        names = [prefix + name for name in quantized_linears(layer, family)]
        hits = set()
        for name in names:
            for pattern in compiled:
                if pattern.search(name):
                    hits.add(name)
                    matched.add(pattern.pattern)
        _check_groups(names, hits)
        kept += sorted(hits)
    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        example = f"{layers_name}.0.mlp.down_proj"
        quoted = ", ".join(f"'{p}'" for p in unmatched)
        raise MergeqError(
            f"--exclude {quoted} matches none of the linears int4 quantizes",
            hint=HINT.replace("model.layers.0.mlp.down_proj", example),
        )
    return Exclusions(tuple(sorted(kept)))


def _check_groups(names: list[str], hits: set[str]) -> None:
    present = set(names)
    for name in sorted(hits):
        parent, _, leaf = name.rpartition(".")
        for group, members in VLLM_FUSED.items():
            siblings = [f"{parent}.{m}" for m in members]
            if leaf in members and all(s in present for s in siblings):
                missing = [s for s in siblings if s not in hits]
                if missing:
                    raise MergeqError(
                        f"--exclude keeps {name} in fp16 but not {', '.join(missing)}: vLLM runs them as one "
                        f"layer ({parent}.{group}) and quantizes all of it or none",
                        hint=f"widen the pattern to all of {', '.join(members)} (e.g. {re.escape(parent)}"
                        f"\\.({'|'.join(members)})$), or to none of them",
                    )
