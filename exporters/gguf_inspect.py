"""What is inside a GGUF file, read with the pinned llama.cpp's own gguf-py, and the size part of its report.

The installed `gguf` package can lag behind the pinned llama.cpp (it may not know a newer tensor type), so
type ids, names and block sizes come from the pinned tree's gguf-py. `read_gguf` parses only the header
(gguf-py's GGUFReader takes seconds on a 49k-token vocabulary; tests/gguf_oracle.py reads the same files with
it, and the tests check both agree). From the tensor
list and llama-quantize's log, `size_info` builds the report's SizeInfo: bytes, bits per weight over the
quantized tensors and over the whole file, the tensor-type histogram, and every quantized tensor that got
another type than the requested one, with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import mmap
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from exporters.report import SizeInfo
from mergeq.core.errors import MergeqError

# Types that store plain numbers rather than quantized blocks.
UNQUANTIZED = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # gguf-py's GGMLQuantizationType name: "F32", "Q4_K", ...
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length ("columns")
    n_elements: int
    n_bytes: int
    data_offset: int = -1  # where its data starts in the file (read_gguf sets it)

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


@lru_cache(maxsize=2)
def pinned_constants(gguf_py: Path | None = None):
    """The pinned gguf-py's constants module (type ids, block sizes), loaded on its own under a private name.

    constants.py imports nothing but the standard library, so it loads without the rest of the pinned
    package and without touching the installed `gguf`.
    """
    from exporters.llamacpp.source import ensure_source

    path = Path(gguf_py or ensure_source().gguf_py) / "gguf" / "constants.py"
    spec = importlib.util.spec_from_file_location("mergeq_pinned_gguf_constants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SCALARS = {  # GGUFValueType name -> struct format (little-endian)
    "UINT8": "<B",
    "INT8": "<b",
    "UINT16": "<H",
    "INT16": "<h",
    "UINT32": "<I",
    "INT32": "<i",
    "FLOAT32": "<f",
    "BOOL": "<?",
    "UINT64": "<Q",
    "INT64": "<q",
    "FLOAT64": "<d",
}


_U64 = struct.Struct("<Q")


class _Cursor:
    """Reads GGUF header values from a memory map, failing clearly at the end of the data."""

    def __init__(self, data, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise MergeqError(
                f"GGUF file {self.path} is truncated: its header ends after {len(self.data)} bytes",
                hint="the file is incomplete or damaged; export it again",
            )
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.pos + length > len(self.data):
            self.take(f"<{length}s")  # raises the truncation error
        raw = bytes(self.data[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Step over `count` length-prefixed strings (token lists: a tight loop, nothing decoded)."""
        data, pos, unpack, end = self.data, self.pos, _U64.unpack_from, len(self.data)
        for _ in range(count):
            if pos + 8 > end:
                break
            pos += 8 + unpack(data, pos)[0]
        self.skip(pos - self.pos)

    def skip(self, size: int) -> None:
        if self.pos + size > len(self.data):
            self.take(f"<{size}s")
        self.pos += size


def read_gguf(path: Path) -> GGUFSummary:
    """Tensor infos and scalar metadata of one GGUF, parsed from its header (tensor data is not read).

    The format is GGUF v2/v3 as written by the pinned gguf-py; type ids, names and block sizes come from
    the pinned gguf-py's constants. Scalar metadata are kept; of arrays (token lists) only the length.
    A file that is not GGUF, or whose header or tensor data is cut short, raises MergeqError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise MergeqError(f"GGUF file {path} does not exist")
    constants = pinned_constants()
    value_types = constants.GGUFValueType
    qtypes = constants.GGMLQuantizationType
    sizes = {t.name: size for t, size in constants.GGML_QUANT_SIZES.items()}
    size_bytes = path.stat().st_size
    if size_bytes < 24:
        raise MergeqError(f"{path} is not a GGUF file ({size_bytes} bytes)", hint="export it again")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cur = _Cursor(data, path)
        if cur.take("<I") != constants.GGUF_MAGIC:
            raise MergeqError(f"{path} is not a GGUF file (wrong magic)", hint="pass a .gguf file written by llama.cpp")
        version = cur.take("<I")
        if version not in (2, 3):
            raise MergeqError(f"{path}: GGUF version {version} is not supported (2 or 3 expected)")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        metadata: dict = {}
        arrays: dict = {}

        def value(kind: int):
            name = value_types(kind).name
            if name == "STRING":
                return cur.string()
            return cur.take(_SCALARS[name])

        for _ in range(n_kv):
            key = cur.string()
            kind = cur.take("<I")
            if kind == value_types.ARRAY:
                item, count = cur.take("<I"), cur.take("<Q")
                arrays[key] = count
                if item == value_types.STRING:
                    cur.skip_strings(count)
                elif item == value_types.ARRAY:
                    raise MergeqError(f"{path}: nested array in {key!r} is not supported")
                else:
                    cur.skip(count * struct.calcsize(_SCALARS[value_types(item).name]))
            else:
                metadata[key] = value(kind)
        tensors, offsets = [], []
        for _ in range(n_tensors):
            name = cur.string()
            shape = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
            type_id, offset = cur.take("<I"), cur.take("<Q")
            try:
                type_name = qtypes(type_id).name
            except ValueError:
                raise MergeqError(
                    f"{path}: tensor {name!r} has type id {type_id}, unknown to the pinned gguf-py"
                ) from None
            block, type_size = sizes[type_name]
            n_elements = math.prod(shape)
            tensors.append(TensorInfo(name, type_name, shape, n_elements, n_elements // block * type_size))
            offsets.append(offset)
        alignment = int(metadata.get("general.alignment", constants.GGUF_DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // alignment) * alignment
        end = max((o + t.n_bytes for o, t in zip(offsets, tensors)), default=0)
        if data_start + end > size_bytes:
            raise MergeqError(
                f"GGUF file {path} is truncated: its tensors need {data_start + end} bytes, the file has {size_bytes}",
                hint="the file is incomplete or damaged; export it again",
            )
        tensors = [dataclasses.replace(t, data_offset=data_start + o) for t, o in zip(tensors, offsets)]
    return GGUFSummary(
        path=path,
        size_bytes=size_bytes,
        metadata=metadata,
        array_lengths=arrays,
        tensors=tensors,
        block_sizes={name: block for name, (block, _) in sizes.items()},
    )


def read_ggufs(paths: list[Path]) -> list[GGUFSummary]:
    return [read_gguf(p) for p in paths]


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
            match["tensor"], int(match["ncols"]), int(match["block"]), match["wanted"].upper(), match["got"].upper()
        )
    count = _FALLBACK_COUNT.search(text)
    return QuantizeLog(fallbacks, int(count.group(1)) if count else 0)


# ----------------------------------------------------------------------------------------------- the size report


def file_quant(summary: GGUFSummary) -> str | None:
    """The llama-quantize type name recorded in the file (general.file_type), e.g. "Q4_K_M", "F16"."""
    code = summary.metadata.get("general.file_type")
    if code is None:
        return None
    try:
        name = pinned_constants().LlamaFileType(int(code)).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def size_info_for_file(summary: GGUFSummary) -> tuple[SizeInfo, str, list[str]]:
    """size_info for a GGUF without its export log (e.g. `mergeq eval`): the type comes from the file."""
    from exporters.llamacpp.pin import load_pin

    quant = file_quant(summary) or summary.path.stem
    info, warnings = size_info(summary, quant, load_pin().default_types.get(quant))
    return info, quant, warnings


def size_info(
    summary: GGUFSummary, quant: str, wanted_type: str | None, quantize_log: str | None = None
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
                why = (
                    f"{rule}{entry.columns} columns are not a multiple of {entry.block} "
                    f"({entry.wanted} block size), so llama-quantize fell back to {tensor.type}"
                )
                fallbacks.append(
                    {
                        "tensor": tensor.name,
                        "wanted": entry.wanted,
                        "got": tensor.type,
                        "why": why,
                        "kind": "shape",
                        "columns": entry.columns,
                    }
                )
            elif wanted_block and tensor.columns % wanted_block:
                # not announced: the rules picked a fitting type themselves (the output tensor goes to Q8_0)
                why = (
                    f"{tensor.columns} columns are not a multiple of {wanted_block} ({wanted_type} block size); "
                    f"llama-quantize's rules put this tensor in {tensor.type}"
                )
                fallbacks.append(
                    {
                        "tensor": tensor.name,
                        "wanted": wanted_type,
                        "got": tensor.type,
                        "why": why,
                        "kind": "shape",
                        "columns": tensor.columns,
                    }
                )
            else:
                why = (
                    f"{quant}'s mixture rules keep this tensor in {tensor.type}"
                    if tensor.type in UNQUANTIZED
                    else f"{quant}'s mixture rules give this tensor {tensor.type} instead of {wanted_type}"
                )
                fallbacks.append(
                    {
                        "tensor": tensor.name,
                        "wanted": wanted_type,
                        "got": tensor.type,
                        "why": why,
                        "kind": "mixture",
                        "columns": tensor.columns,
                    }
                )
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
        problems.append(
            f"llama-quantize reported {logged.reported_count} fallback tensors but its log named "
            f"{len(logged.fallbacks)}"
        )
    for entry in logged.fallbacks.values():
        try:
            tensor = summary.tensor(entry.tensor)
        except KeyError:
            problems.append(f"llama-quantize named fallback tensor {entry.tensor}, which is not in {summary.path.name}")
            continue
        block = summary.block_sizes.get(entry.wanted)
        if tensor.type != entry.got or tensor.columns != entry.columns or (block and tensor.columns % block == 0):
            problems.append(
                f"{entry.tensor}: llama-quantize logged {entry.wanted} -> {entry.got} for "
                f"{entry.columns} columns, but the file holds {tensor.type} with {tensor.columns} columns"
            )
    return problems
