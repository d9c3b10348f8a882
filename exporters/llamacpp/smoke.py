"""The smoke test a llama.cpp build passes before it is stamped, and that `mergeq doctor` runs again: every
pinned tool on a tiny GGUF made on the spot, in a few seconds."""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from exporters.llamacpp.layout import Layout, pinned_python_env
from exporters.llamacpp.pin import Pin, load_pin
from exporters.llamacpp.run import ToolCommand, run_tool
from mergeq.core.errors import ToolError

SMOKE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A merged model is exported, quantized and measured; "
    "every tool of the pinned build runs once on a tiny model before the build is trusted. "
) * 4
TINY_WRITER = Path(__file__).resolve().with_name("tiny.py")


@dataclass(frozen=True)
class SmokeCheck:
    """One tool's run in the smoke test: passed when `error` is None."""

    tool: str
    seconds: float
    error: str | None = None
    returncode: int | None = None

    @property
    def died_by_signal(self) -> bool:
        return self.returncode is not None and self.returncode < 0


@dataclass(frozen=True)
class SmokeResult:
    checks: tuple[SmokeCheck, ...]

    @property
    def passed(self) -> bool:
        return all(check.error is None for check in self.checks)

    @property
    def failed(self) -> list[SmokeCheck]:
        return [check for check in self.checks if check.error is not None]

    def summary(self) -> str:
        if self.passed:
            return "passed: " + ", ".join(f"{c.tool} {c.seconds:.1f} s" for c in self.checks)
        return "; ".join(c.error.splitlines()[0].removesuffix("; its last output lines:") for c in self.failed)

    def as_json(self) -> dict:
        return {
            "passed": self.passed,
            "checks": [
                {"tool": c.tool, "seconds": round(c.seconds, 2), "error": c.error, "returncode": c.returncode}
                for c in self.checks
            ],
        }


def write_tiny_gguf(where: Layout, path: Path) -> None:
    """The smoke test's model, written by the pinned gguf-py (exporters/llamacpp/tiny.py)."""
    run_tool(
        ToolCommand("tiny GGUF writer", (sys.executable, str(TINY_WRITER), str(path)), env=pinned_python_env(where))
    )


def smoke_test(where: Layout, pin: Pin | None = None) -> SmokeResult:
    """Run every pinned tool in `where.bin` on a tiny GGUF made on the spot, in a few seconds.

    llama-quantize writes a Q8_0 copy (rows of 64: the matrix products then take AMX tiles where the build
    has them), llama-perplexity and llama-imatrix multiply with it, and every other tool prints its version.
    A failure is recorded, not raised: the caller decides between a portable rebuild and an error.
    """
    pin = pin or load_pin()
    checks: list[SmokeCheck] = []
    with tempfile.TemporaryDirectory(prefix="mergeq-llamacpp-smoke-") as tmp:
        work = Path(tmp)
        f16, q8, text = work / "tiny-f16.gguf", work / "tiny-q8_0.gguf", work / "text.txt"
        text.write_text(SMOKE_TEXT)
        write_tiny_gguf(where, f16)
        threads = "2"
        steps = {
            "llama-quantize": (f16, q8, "Q8_0", threads),
            "llama-perplexity": ("-m", q8, "-f", text, "-c", "64", "-b", "64", "--chunks", "2", "-t", threads),
            "llama-imatrix": (
                "-m",
                q8,
                "-f",
                text,
                "-c",
                "64",
                "--chunks",
                "2",
                "-t",
                threads,
                "-o",
                work / "imatrix.gguf",
            ),
        }
        for name in pin.targets:
            args = steps.get(name, ("--version",))
            if name != "llama-quantize" and name in steps and not q8.is_file():
                checks.append(SmokeCheck(name, 0.0, "not run: llama-quantize wrote no Q8_0 model"))
                continue
            started = time.perf_counter()
            try:
                run_tool(ToolCommand(name, (str(where.bin / name), *(str(a) for a in args))))
            except ToolError as err:
                checks.append(
                    SmokeCheck(name, time.perf_counter() - started, str(err), getattr(err, "returncode", None))
                )
            else:
                checks.append(SmokeCheck(name, time.perf_counter() - started))
    return SmokeResult(tuple(checks))
