"""What is inside a GGUF file, read with the pinned llama.cpp's own gguf-py, and the size part of its report.

The installed `gguf` package can lag behind the pinned llama.cpp (it may not know a newer tensor type), so
files are read in a subprocess whose `gguf` is the pinned tree's gguf-py (`read_ggufs`). From the tensor
list and llama-quantize's log, `size_info` builds the report's SizeInfo: bytes, bits per weight over the
quantized tensors and over the whole file, the tensor-type histogram, and every quantized tensor that got
another type than the requested one, with the reason.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from exporters.report import SizeInfo
from mergeq.errors import MergeqError

# Types that store plain numbers rather than quantized blocks.
UNQUANTIZED = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # gguf-py's GGMLQuantizationType name: "F32", "Q4_K", ...
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length ("columns")
    n_elements: int
    n_bytes: int

    @property
    def columns(self) -> int:
        return self.shape[0]

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2 and any(d > 1 for d in self.shape[1:])


@dataclass
class GGUFSummary:
    path: Path
    size_bytes: int
    metadata: dict  # scalar key/values (strings, numbers, bools)
    array_lengths: dict  # array keys -> their length (token lists are not copied out)
    tensors: list[TensorInfo]
    block_sizes: dict[str, int] = field(default_factory=dict)  # every type gguf-py knows -> elements per block

    @property
    def parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def histogram(self) -> dict[str, int]:
        return dict(sorted(Counter(t.type for t in self.tensors).items()))

    def tensor(self, name: str) -> TensorInfo:
        for info in self.tensors:
            if info.name == name:
                return info
        raise KeyError(name)


# ----------------------------------------------------------------------------------------------- reading


def _probe(paths: list[str]) -> list[dict]:
    """Runs inside the subprocess whose `gguf` is the pinned gguf-py."""
    import gguf
    from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType

    results = []
    for path in paths:
        reader = GGUFReader(path, "r")
        metadata, arrays = {}, {}
        for name, fld in reader.fields.items():
            if not fld.types:
                continue
            if fld.types[0] == GGUFValueType.ARRAY:
                arrays[name] = len(fld.data)
            else:
                value = fld.contents()
                metadata[name] = value.item() if hasattr(value, "item") else value
        tensors = [
            {"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape],
             "n_elements": int(t.n_elements), "n_bytes": int(t.n_bytes)}
            for t in reader.tensors
        ]
        results.append({"path": path, "metadata": metadata, "arrays": arrays, "tensors": tensors})
    blocks = {t.name: int(size[0]) for t, size in GGML_QUANT_SIZES.items()}
    return [{**r, "block_sizes": blocks, "gguf_py": gguf.__file__} for r in results]


def _main() -> None:
    json.dump(_probe(sys.argv[1:]), sys.stdout, default=str)


def read_ggufs(paths: list[Path]) -> list[GGUFSummary]:
    """Read tensor infos and scalar metadata of each GGUF, with the pinned gguf-py (one subprocess for all)."""
    from exporters import llamacpp

    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise MergeqError(f"GGUF file {path} does not exist")
    where = llamacpp.ensure_source()
    command = llamacpp.ToolCommand(
        "gguf-py reader",
        (sys.executable, "-c", "from exporters.gguf_inspect import _main; _main()", *map(str, paths)),
        env=llamacpp.pinned_python_env(where, llamacpp.REPO_ROOT),
        cwd=llamacpp.REPO_ROOT,
    )
    try:
        result = llamacpp.run_tool(command)
    except MergeqError as err:
        raise MergeqError(f"cannot read GGUF {', '.join(map(str, paths))}: {err}",
                          hint="the file is truncated or not a GGUF file; export it again") from err
    summaries = []
    for path, raw in zip(paths, json.loads(result.stdout)):
        if not str(raw["gguf_py"]).startswith(str(where.gguf_py)):
            raise MergeqError(f"the GGUF reader imported {raw['gguf_py']}, not the pinned gguf-py in {where.gguf_py}")
        summaries.append(GGUFSummary(
            path=path, size_bytes=path.stat().st_size, metadata=raw["metadata"], array_lengths=raw["arrays"],
            tensors=[TensorInfo(t["name"], t["type"], tuple(t["shape"]), t["n_elements"], t["n_bytes"])
                     for t in raw["tensors"]],
            block_sizes=raw["block_sizes"],
        ))
    return summaries


def read_gguf(path: Path) -> GGUFSummary:
    return read_ggufs([path])[0]


# ----------------------------------------------------------------------------------------------- llama-quantize's log

_FALLBACK_LINE = re.compile(
    r"warning:\s+(?P<tensor>\S+)\s+-\s+ncols\s+(?P<ncols>\d+)\s+not divisible by\s+(?P<block>\d+)\s+"
    r"\(required for type\s+(?P<wanted>\S+)\)\s*(?P<forced>\(WARNING: must use F16 due to unusual shape\)\s*)?"
    r"->\s*falling back to\s+(?P<got>\S+)"
)
_FALLBACK_COUNT = re.compile(r"WARNING:\s+(\d+) of (\d+) tensor\(s\) required fallback quantization")


@dataclass(frozen=True)
class ShapeFallback:
    tensor: str
    columns: int
    block: int
    wanted: str
    got: str


@dataclass
class QuantizeLog:
    fallbacks: dict[str, ShapeFallback]
    reported_count: int  # from llama-quantize's summary line (0 when it printed none)


def parse_quantize_log(text: str) -> QuantizeLog:
    """The shape fallbacks that llama-quantize announced ("ncols N not divisible by B ... falling back to T")."""
    fallbacks = {}
    for match in _FALLBACK_LINE.finditer(text):
        fallbacks[match["tensor"]] = ShapeFallback(
            match["tensor"], int(match["ncols"]), int(match["block"]), match["wanted"].upper(), match["got"].upper())
    count = _FALLBACK_COUNT.search(text)
    return QuantizeLog(fallbacks, int(count.group(1)) if count else 0)


# ----------------------------------------------------------------------------------------------- the size report


def size_info(summary: GGUFSummary, quant: str, wanted_type: str | None, quantize_log: str | None = None
              ) -> tuple[SizeInfo, list[str]]:
    """SizeInfo of one GGUF requested as `quant` (whose tensors should be `wanted_type`), plus warnings.

    Every weight matrix that got another type than `wanted_type` is listed in `fallbacks`, as kind "shape"
    when its row length is not a multiple of the wanted type's block (llama-quantize announced a fallback,
    which is checked against the file; or its rules picked a fitting type themselves, as for the output
    tensor), else as kind "mixture" (the file type's own rules, e.g. Q6_K for some ffn_down in Q4_K_M).
    """
    warnings: list[str] = []
    parameters = summary.parameters
    quantized = [t for t in summary.tensors if t.type not in UNQUANTIZED]
    q_bits = (8 * sum(t.n_bytes for t in quantized) / sum(t.n_elements for t in quantized)) if quantized else None
    fallbacks: list[dict] = []
    logged = parse_quantize_log(quantize_log) if quantize_log is not None else None
    if logged is not None:
        warnings += _verify_log(summary, logged)
    if wanted_type and wanted_type not in UNQUANTIZED:
        wanted_block = summary.block_sizes.get(wanted_type)
        for tensor in summary.tensors:
            if not tensor.is_matrix or tensor.type == wanted_type:
                continue
            entry = logged.fallbacks.get(tensor.name) if logged is not None else None
            if entry is not None:  # announced by llama-quantize, and checked against the file above
                rule = "" if entry.wanted == wanted_type else f"{quant}'s rules give this tensor {entry.wanted}; "
                why = (f"{rule}{entry.columns} columns are not a multiple of {entry.block} "
                       f"({entry.wanted} block size), so llama-quantize fell back to {tensor.type}")
                fallbacks.append({"tensor": tensor.name, "wanted": entry.wanted, "got": tensor.type,
                                  "why": why, "kind": "shape", "columns": entry.columns})
            elif wanted_block and tensor.columns % wanted_block:
                # not announced: the rules picked a fitting type themselves (the output tensor goes to Q8_0)
                why = (f"{tensor.columns} columns are not a multiple of {wanted_block} ({wanted_type} block size); "
                       f"llama-quantize's rules put this tensor in {tensor.type}")
                fallbacks.append({"tensor": tensor.name, "wanted": wanted_type, "got": tensor.type,
                                  "why": why, "kind": "shape", "columns": tensor.columns})
            else:
                why = (f"{quant}'s mixture rules keep this tensor in {tensor.type}" if tensor.type in UNQUANTIZED
                       else f"{quant}'s mixture rules give this tensor {tensor.type} instead of {wanted_type}")
                fallbacks.append({"tensor": tensor.name, "wanted": wanted_type, "got": tensor.type,
                                  "why": why, "kind": "mixture", "columns": tensor.columns})
    info = SizeInfo(
        size_bytes=summary.size_bytes,
        fp16_bytes=2 * parameters,
        bits_per_weight=8 * summary.size_bytes / parameters if parameters else float("nan"),
        bits_per_quantized_weight=q_bits,
        tensor_types=summary.histogram(),
        fallbacks=fallbacks,
    )
    return info, warnings


def _verify_log(summary: GGUFSummary, logged: QuantizeLog) -> list[str]:
    """Every fallback llama-quantize announced must be visible in the file, with the shape it named."""
    problems = []
    if logged.reported_count != len(logged.fallbacks):
        problems.append(f"llama-quantize reported {logged.reported_count} fallback tensors but its log named "
                        f"{len(logged.fallbacks)}")
    for entry in logged.fallbacks.values():
        try:
            tensor = summary.tensor(entry.tensor)
        except KeyError:
            problems.append(f"llama-quantize named fallback tensor {entry.tensor}, which is not in {summary.path.name}")
            continue
        block = summary.block_sizes.get(entry.wanted)
        if tensor.type != entry.got or tensor.columns != entry.columns or (block and tensor.columns % block == 0):
            problems.append(f"{entry.tensor}: llama-quantize logged {entry.wanted} -> {entry.got} for "
                            f"{entry.columns} columns, but the file holds {tensor.type} with {tensor.columns} columns")
    return problems
