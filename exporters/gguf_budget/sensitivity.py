"""What each candidate type costs each tensor: its imatrix-weighted relative quantization error, measured.

Every candidate is made by the pinned llama-quantize itself (with the imatrix, as the final file will be),
in rounds: round r gives each tensor the r-th type its shape allows, through --tensor-type-file, so a round
quantizes every tensor once and no type is made for a tensor it cannot fit. A subprocess running the pinned
gguf-py then dequantizes each round's tensors and compares them with the intermediate:

    error(t, type) = sum_j w_j * ||W[:, j] - Q[:, j]||^2  /  sum_j w_j * ||W[:, j]||^2

with w_j the imatrix's mean squared activation of input column j (the expected squared error of the layer's
output relative to the output itself); tensors the imatrix has no entry for (a token embedding) weigh every
column equally.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from exporters.gguf_budget.slots import Slot, type_file_lines
from exporters.gguf_inspect import read_gguf
from exporters.llamacpp.build import tool_command
from exporters.llamacpp.layout import pinned_python_env
from exporters.llamacpp.run import ToolCommand, run_tool
from exporters.llamacpp.source import ensure_source
from mergeq.core.atomic import write_text

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
ROW_CHUNK = 4096  # rows dequantized at a time in the error pass


@dataclass
class Sensitivity:
    errors: dict[str, dict[str, float]]  # tensor -> type -> relative error
    weighted: dict[str, bool]  # tensor -> whether the imatrix weighed its columns
    kept: list[str]  # slots llama-quantize left unquantized (not tensors the budget can change)
    seconds: float = 0.0


def rounds(slots: list[Slot]) -> list[dict[str, str]]:
    """Round r: each tensor that has an r-th candidate type, with that type."""
    depth = max((len(s.candidates) for s in slots), default=0)
    return [{s.name: s.candidates[r] for s in slots if r < len(s.candidates)} for r in range(depth)]


def quantize_mix(intermediate: Path, out: Path, types: dict[str, str], imatrix: Path | None,
                 threads: int | None, base_type: str = "Q8_0"):
    """One llama-quantize run giving each named tensor its type (--pure: no mixture rules for the others,
    which get `base_type`). Returns the tool result (its log lists every override it applied)."""
    type_file = out.with_name(out.name + ".types.txt")
    write_text(type_file, type_file_lines(types))
    args = ["--pure", "--tensor-type-file", type_file]
    if imatrix is not None:
        args += ["--imatrix", imatrix]
    args += [intermediate, out, base_type]
    if threads:
        args.append(str(threads))
    return run_tool(tool_command("llama-quantize", *args),
                    hint="llama-quantize could not make the budgeted mix; see its last lines above")


def measure(intermediate: Path, imatrix: Path | None, slots: list[Slot], work: Path,
            threads: int | None = None, on_round=None) -> Sensitivity:
    """Quantize every candidate of every slot (one llama-quantize run per round) and measure the errors."""
    import time

    started = time.perf_counter()
    files = []
    for r, types in enumerate(rounds(slots)):
        out = work / f"round-{r:02d}.gguf"
        quantize_mix(intermediate, out, types, imatrix, threads)
        files.append(out)
        if on_round is not None:
            on_round(r)
    result = errors_of(intermediate, imatrix, files, [s.name for s in slots])
    for path in files:
        path.unlink(missing_ok=True)
    wanted = {s.name: set(s.candidates) for s in slots}
    errors = {name: {t: e for t, e in by_type.items() if t in wanted[name]}
              for name, by_type in result["errors"].items()}
    kept = sorted(name for name in wanted if not errors.get(name))
    return Sensitivity({k: v for k, v in errors.items() if v}, result["weighted"], kept,
                       time.perf_counter() - started)


def errors_of(reference: Path, imatrix: Path | None, files: list[Path], names: list[str]) -> dict:
    """Run the error pass in a subprocess under the pinned gguf-py (the installed `gguf` may lag the pin)."""
    where = ensure_source()
    request = {"reference": str(reference), "imatrix": str(imatrix) if imatrix else None,
               "files": [str(f) for f in files], "tensors": names}
    request_file = Path(files[0]).with_name("errors-request.json") if files else Path(reference).with_suffix(".json")
    write_text(request_file, json.dumps(request))
    result = run_tool(ToolCommand(
        "gguf-py error pass",
        (sys.executable, "-c", "from exporters.gguf_budget.sensitivity import _main; _main()", str(request_file)),
        env={**pinned_python_env(where, REPO_ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        cwd=REPO_ROOT))
    return json.loads(result.stdout)


def quantized_types(path: Path) -> dict[str, str]:
    """Tensor name -> type of a GGUF (the header only)."""
    return {t.name: t.type for t in read_gguf(path).tensors}


# ----------------------------------------------------------------------------------------------- the subprocess


def _column_weights(reader_tensors: dict, name: str, n_cols: int, n_rows: int):
    """The imatrix's mean squared activation per input column, shaped to broadcast over (rows, cols);
    None when it has no entry for `name`."""
    import numpy as np

    sums, counts = reader_tensors.get(f"{name}.in_sum2"), reader_tensors.get(f"{name}.counts")
    if sums is None or counts is None:
        return None
    sums = np.asarray(sums, dtype=np.float64).reshape(-1)
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    groups = sums.size // n_cols  # experts of a 3-D tensor share rows in blocks
    mean = sums.reshape(groups, n_cols) / np.maximum(counts.reshape(groups, 1), 1.0)
    return np.repeat(mean, n_rows // groups, axis=0) if groups > 1 else mean


def _main() -> None:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    request = json.loads(Path(sys.argv[1]).read_text())
    wanted = set(request["tensors"])
    reference = {t.name: t for t in GGUFReader(request["reference"], "r").tensors if t.name in wanted}
    imatrix = {}
    if request["imatrix"]:
        imatrix = {t.name: t.data for t in GGUFReader(request["imatrix"], "r").tensors}
    errors: dict[str, dict[str, float]] = {name: {} for name in reference}
    weighted: dict[str, bool] = {}
    signal: dict[str, tuple] = {}
    for path in request["files"]:
        for tensor in GGUFReader(path, "r").tensors:
            ref = reference.get(tensor.name)
            qtype = tensor.tensor_type.name
            if ref is None or qtype in ("F32", "F16", "BF16") or qtype in errors[tensor.name]:
                continue
            data = np.asarray(ref.data)
            n_cols = int(ref.shape[0])
            w_ref = data.reshape(-1, n_cols)
            q_rows = np.asarray(tensor.data).reshape(w_ref.shape[0], -1)
            weights = _column_weights(imatrix, tensor.name, n_cols, w_ref.shape[0])
            weighted[tensor.name] = weights is not None
            err = 0.0
            total = 0.0
            for start in range(0, w_ref.shape[0], ROW_CHUNK):
                w = w_ref[start:start + ROW_CHUNK].astype(np.float32)
                q = dequantize(q_rows[start:start + ROW_CHUNK], tensor.tensor_type).reshape(w.shape)
                diff = (w - q) ** 2
                if weights is None:
                    err += float(diff.sum(dtype=np.float64))
                    if tensor.name not in signal:
                        total += float((w * w).sum(dtype=np.float64))
                else:
                    cw = weights if weights.shape[0] == 1 else weights[start:start + ROW_CHUNK]
                    err += float((diff * cw).sum(dtype=np.float64))
                    if tensor.name not in signal:
                        total += float((w * w * cw).sum(dtype=np.float64))
            if tensor.name not in signal:
                signal[tensor.name] = (total,)
            errors[tensor.name][qtype] = err / signal[tensor.name][0] if signal[tensor.name][0] > 0 else 0.0
    json.dump({"errors": errors, "weighted": weighted}, sys.stdout, sort_keys=True)
