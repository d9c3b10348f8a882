"""merge_manifest.json: where a merged checkpoint came from and what was done to it.

sha256 of every input file, each adapter's config and the scale actually applied to every module, the
output dtype and layout, tool versions, the validation numbers, and the QLoRA decision (`qlora`: every piece of
evidence that the adapter was trained on a 4-bit base, and the merge target chosen from it). No timestamps: equal
inputs give an equal manifest.
"""

from __future__ import annotations

from mergeq.core.hashing import tree_hashes
from mergeq.core.versions import recorded_versions

MANIFEST_NAME = "merge_manifest.json"
SCHEMA = 1


def _source_entry(source, hashes: dict) -> dict:
    entry = {
        "path": str(source.folder),
        "format": source.ckpt.format,
        "kind": source.kind,
        "files": hashes.get(source.folder) or tree_hashes(source.folder, recursive=False),
    }
    if source.quant:
        entry["quantized_tensors"] = len(source.quant)
    if source.requantize is not None:
        entry["requantized"] = {
            "quant_type": source.requantize.quant_type,
            "blocksize": source.requantize.blocksize,
            "double_quant": source.requantize.double_quant,
            "tensors": len(source.requantized),
        }
    return entry


def build(
    *,
    config,
    chosen,
    sources,
    facts: dict,
    aux: list[str],
    adapters: list[dict],
    validation: dict | None,
    fidelity: dict | None,
    warnings: list[str],
    hashes: dict | None = None,
    qlora: dict | None = None,
) -> dict:
    hashes = hashes or {}
    adapter_entries = []
    for entry, adapter in zip(adapters, chosen.adapters):
        adapter_entries.append(
            {**entry, "files": hashes.get(adapter.path) or tree_hashes(adapter.path, recursive=False)}
        )
    return {
        "schema": SCHEMA,
        "tool": "mergeq merge",
        "dtype": config.dtype,
        "inputs": {
            "sources": {s.label: _source_entry(s, hashes) for s in sources},
            "adapters": adapter_entries,
        },
        "merge_target": chosen.label,
        "qlora": qlora,
        "method": "fp32 accumulation, one cast; several adapters: W + sum_i weight_i * (merge_i(W) - W)",
        "output": {
            "shards": facts["shards"],
            "total_bytes": facts["index"]["metadata"]["total_size"],
            "tensors": len(facts["index"]["weight_map"]),
            "tied_embeddings": facts["tied"],
            "lm_head_written_separately": facts["lm_head_written_separately"],
            "vocab_size": facts["vocab_size"],
            "copied_files": aux,
        },
        "validation": validation if validation is not None else {"skipped": "--no-validate"},
        "qlora_fidelity": fidelity,
        "versions": recorded_versions(),
        "warnings": list(warnings),
    }
