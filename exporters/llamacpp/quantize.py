"""llama-quantize, run so that the same inputs give the same bytes."""

from __future__ import annotations

from pathlib import Path

from exporters.llamacpp.build import tool_command
from exporters.llamacpp.run import ToolCommand, run_tool


def quantize(
    intermediate: Path, out: Path, qtype: str, imatrix: Path | None, threads: int | None, *flags: str | Path, hint: str
):
    """llama-quantize from `intermediate` to `out`. It runs in the imatrix's folder and is given the imatrix by
    name: it records that argument in the file (quantize.imatrix.file), and a temporary folder's path there
    would make the same inputs give different bytes."""
    args = [*flags]
    if imatrix is not None:
        args += ["--imatrix", Path(imatrix).name]
    args += [Path(intermediate).absolute(), Path(out).absolute(), qtype]
    if threads:
        args.append(str(threads))
    command = tool_command("llama-quantize", *args)
    return run_tool(
        ToolCommand(command.name, command.argv, command.env, Path(imatrix).parent if imatrix else None), hint=hint
    )
