"""What each candidate type costs each tensor: its imatrix-weighted relative quantization error, measured.

Every candidate is made by the pinned llama-quantize itself (with the imatrix, as the final file will be),
in rounds: round r gives each tensor the r-th type its shape allows, through --tensor-type-file, so a round
quantizes every tensor once and no type is made for a tensor it cannot fit. A subprocess running the pinned
gguf-py then dequantizes each round's tensors and compares them with the intermediate:

    error(t, type) = sum_j w_j * ||W[:, j] - Q[:, j]||^2  /  sum_j w_j * ||W[:, j]||^2

with w_j the imatrix's mean squared activation of input column j (the expected squared error of the layer's
output relative to the output itself); tensors the imatrix has no entry for (a token embedding) weigh every
column equally.

Each w_j is capped at COLUMN_CAP times the tensor's median. A few input columns can carry "massive
activations": in the demo model's blk.11.ffn_down four of 1536 columns hold 99.9% of the imatrix's mass.
Uncapped, both sums measure only those columns (which the imatrix-guided quantizer keeps precise), so that
tensor's error ranked a thousand times below its neighbours' at every type and the allocator gave it Q2_K;
alone, that one change raised the measured KL by 0.0034 over the all-Q8_0 mix (the proxy predicted 1e-5).
Capped, the same type gives every ffn_down of the model a relative error within about 20% of the others'.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from exporters.gguf_budget.slots import Slot, type_file_lines
from exporters.llamacpp.layout import pinned_python_env
from exporters.llamacpp.quantize import quantize
from exporters.llamacpp.run import ToolCommand, run_tool
from exporters.llamacpp.source import ensure_source
from mergeq.core.atomic import write_text

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
ROW_CHUNK = 4096  # rows dequantized at a time in the error pass
COLUMN_CAP = 100.0  # an input column weighs at most this many times the median column (see the module doc)


def rounds(slots: list[Slot], second: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Round 0: every tensor at its first candidate type. Round 1, given `second`: those types (the search
    measures that round's KL too: its low probe). Then each remaining (tensor, type) pair once, round r giving
    each tensor its next type not yet made, in candidate order."""
    out = [{s.name: s.candidates[0] for s in slots}]
    if second:
        out.append(dict(second))
    todo = {
        s.name: [t for t in s.candidates if t != s.candidates[0] and t != (second or {}).get(s.name)] for s in slots
    }
    while any(todo.values()):
        out.append({name: left.pop(0) for name, left in todo.items() if left})
    return out


def quantize_mix(
    intermediate: Path,
    out: Path,
    types: dict[str, str],
    imatrix: Path | None,
    threads: int | None,
    base_type: str = "Q8_0",
):
    """One llama-quantize run giving each named tensor its type (--pure: no mixture rules for the others,
    which get `base_type`). Returns the tool result (its log lists every override it applied)."""
    type_file = out.with_name(out.name + ".types.txt")
    write_text(type_file, type_file_lines(types))
    return quantize(
        intermediate,
        out,
        base_type,
        imatrix,
        threads,
        "--pure",
        "--tensor-type-file",
        type_file.absolute(),
        hint="llama-quantize could not make the budgeted mix; see its last lines",
    )


def errors_of(reference: Path, imatrix: Path | None, files: list[Path], names: list[str]) -> dict:
    """Run the error pass in a subprocess under the pinned gguf-py (the installed `gguf` may lag the pin)."""
    where = ensure_source()
    request = {
        "reference": str(reference),
        "imatrix": str(imatrix) if imatrix else None,
        "files": [str(f) for f in files],
        "tensors": names,
    }
    request_file = Path(files[0]).with_name("errors-request.json") if files else Path(reference).with_suffix(".json")
    write_text(request_file, json.dumps(request))
    result = run_tool(
        ToolCommand(
            "gguf-py error pass",
            (sys.executable, "-c", "from exporters.gguf_budget.sensitivity import _main; _main()", str(request_file)),
            env={**pinned_python_env(where, REPO_ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
            cwd=REPO_ROOT,
        )
    )
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------------------- the subprocess


def _array(path: Path, info, mm):
    """A tensor's data from a memory map: floats as (rows, cols) float32, quantized types as (rows, bytes) uint8."""
    import numpy as np

    cols = info.shape[0]
    rows = info.n_elements // cols
    raw = mm[info.data_offset : info.data_offset + info.n_bytes]
    if info.type == "F32":
        return np.frombuffer(raw, dtype="<f4").reshape(rows, cols)
    if info.type == "F16":
        return np.frombuffer(raw, dtype="<f2").reshape(rows, cols)
    if info.type == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(rows, cols)
    return np.frombuffer(raw, dtype=np.uint8).reshape(rows, -1)


def _column_weights(imatrix: dict, name: str, n_cols: int, n_rows: int):
    """The imatrix's mean squared activation per input column, capped at COLUMN_CAP times the median, shaped to
    broadcast over (rows, cols); None when it has no entry for `name`."""
    import numpy as np

    sums, counts = imatrix.get(f"{name}.in_sum2"), imatrix.get(f"{name}.counts")
    if sums is None or counts is None:
        return None
    sums = np.asarray(sums, dtype=np.float64).reshape(-1)
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    groups = sums.size // n_cols  # experts of a 3-D tensor share rows in blocks
    mean = sums.reshape(groups, n_cols) / np.maximum(counts.reshape(groups, 1), 1.0)
    mean = np.minimum(mean, COLUMN_CAP * np.median(mean, axis=1, keepdims=True)).astype(np.float32)
    return np.repeat(mean, n_rows // groups, axis=0) if groups > 1 else mean


def _main() -> None:
    """Headers by mergeq's reader (gguf-py's GGUFReader spends seconds on a large vocabulary), data by memory
    map, dequantization by the pinned gguf-py."""
    import mmap

    import numpy as np
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    from exporters.gguf_inspect import read_gguf

    request = json.loads(Path(sys.argv[1]).read_text())
    wanted = set(request["tensors"])
    maps = []

    def open_map(path):
        handle = open(path, "rb")
        mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        maps.append((handle, mm))
        return mm

    ref_summary = read_gguf(Path(request["reference"]))
    ref_map = open_map(request["reference"])
    reference = {t.name: t for t in ref_summary.tensors if t.name in wanted}
    imatrix = {}
    if request["imatrix"]:
        summary = read_gguf(Path(request["imatrix"]))
        mm = open_map(request["imatrix"])
        imatrix = {
            t.name: np.frombuffer(mm[t.data_offset : t.data_offset + t.n_bytes], dtype="<f4") for t in summary.tensors
        }
    errors: dict[str, dict[str, float]] = {}
    weighted: dict[str, bool] = {}
    for path in request["files"]:
        q_map = open_map(path)
        for tensor in read_gguf(Path(path)).tensors:
            ref = reference.get(tensor.name)
            if ref is None or tensor.type in ("F32", "F16", "BF16"):
                continue
            w_all = _array(Path(request["reference"]), ref, ref_map)
            q_all = _array(Path(path), tensor, q_map)
            weights = _column_weights(imatrix, tensor.name, w_all.shape[1], w_all.shape[0])
            weighted[tensor.name] = weights is not None
            qtype = GGMLQuantizationType[tensor.type]
            err = total = 0.0
            for start in range(0, w_all.shape[0], ROW_CHUNK):
                w = w_all[start : start + ROW_CHUNK].astype(np.float32)
                q = dequantize(q_all[start : start + ROW_CHUNK], qtype).reshape(w.shape)
                cw = (
                    1.0 if weights is None else weights if weights.shape[0] == 1 else weights[start : start + ROW_CHUNK]
                )
                err += float(((w - q) ** 2 * cw).sum(dtype=np.float64))
                total += float((w * w * cw).sum(dtype=np.float64))
            errors.setdefault(tensor.name, {})[tensor.type] = err / total if total > 0 else 0.0
    for handle, mm in maps:
        mm.close()
        handle.close()
    json.dump({"errors": errors, "weighted": weighted}, sys.stdout, sort_keys=True)
