"""The cmake build of the pinned llama.cpp, in one of two variants (native: -march=native; portable: this CPU's
extensions named one by one, AMX off), proven by the smoke test before it is stamped; and the built tools.

`ensure_built` is everything `mergeq setup-llamacpp` does: fetch, verify, extract, build, smoke-test, stamp.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from exporters.llamacpp.layout import Layout, built_variant, layout, read_stamp, setup_lock
from exporters.llamacpp.pin import Pin, load_pin
from exporters.llamacpp.run import ToolCommand, run_tool
from exporters.llamacpp.smoke import smoke_test
from exporters.llamacpp.source import fetch_source
from mergeq.core.atomic import atomic_file, write_json
from mergeq.core.errors import MergeqError, ToolError

log = logging.getLogger(__name__)

INSTALL_HINT = "install them with: apt-get install cmake g++ make   (or: pip install cmake, plus a C++ compiler)"


def _stamp_content(pin: Pin) -> dict:
    return {
        "package": pin.package,
        "version": pin.version,
        "sha256": pin.sha256,
        "commit": pin.commit,
        "cmake_args": list(pin.cmake_args),
        "targets": list(pin.targets),
    }


def cpu_fingerprint() -> str:
    """Which CPU the build is for: the build uses -march=native (GGML_NATIVE), so binaries built on one CPU
    may die with SIGILL on another (a CI cache restored on a different runner). A new CPU means a clean rebuild."""
    flags = " ".join(sorted(cpu_flags()))
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:16]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is no such file)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


NATIVE, PORTABLE = "native", "portable"
VARIANTS = (NATIVE, PORTABLE)

# x86 extensions as /proc/cpuinfo names them -> the ggml option that compiles them in (ggml/CMakeLists.txt).
# The portable variant turns on each one the CPU lists, and never AMX: ggml's AMX matrix multiply is what
# died by SIGILL on Xeons that list amx_tile/amx_int8 (issue 11).
X86_EXTENSIONS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("sse4_2",), "GGML_SSE42"),
    (("avx",), "GGML_AVX"),
    (("avx_vnni",), "GGML_AVX_VNNI"),
    (("avx2",), "GGML_AVX2"),
    (("bmi2",), "GGML_BMI2"),
    (("fma",), "GGML_FMA"),
    (("f16c",), "GGML_F16C"),
    (("avx512f", "avx512vl", "avx512dq", "avx512bw"), "GGML_AVX512"),  # ggml adds -mavx512{vl,dq,bw} with it
    (("avx512f", "avx512vbmi"), "GGML_AVX512_VBMI"),
    (("avx512f", "avx512_vnni"), "GGML_AVX512_VNNI"),
    (("avx512f", "avx512_bf16"), "GGML_AVX512_BF16"),
)
AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def variant_cmake_args(
    variant: str, flags: frozenset[str] | None = None, machine: str | None = None
) -> tuple[str, ...]:
    """The cmake arguments that select the instruction set of `variant` on a CPU with `flags`."""
    if variant == NATIVE:
        return ("-DGGML_NATIVE=ON",)
    if variant != PORTABLE:
        raise MergeqError(f"unknown llama.cpp build variant {variant!r}", hint=f"use one of {', '.join(VARIANTS)}")
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "i386"):
        return ("-DGGML_NATIVE=OFF",)  # the compiler's baseline for this architecture
    options = [f"-D{option}={'ON' if set(needs) <= flags else 'OFF'}" for needs, option in X86_EXTENSIONS]
    return ("-DGGML_NATIVE=OFF", *options, *(f"-D{option}=OFF" for option in AMX_OPTIONS))


def is_built(pin: Pin | None = None) -> bool:
    """True when the stamp matches the pin and every tool binary is there (no lock, no work)."""
    pin = pin or load_pin()
    where = layout(pin)
    stamp = read_stamp(where)
    if stamp is None or stamp.get("pin") != _stamp_content(pin) or stamp.get("cpu") != cpu_fingerprint():
        return False
    if stamp.get("variant", {}).get("name") not in VARIANTS or not stamp.get("smoke", {}).get("passed"):
        return False  # a stamp from before builds proved themselves: build and test again
    return all(os.access(where.bin / name, os.X_OK) for name in pin.targets)


@dataclass(frozen=True)
class BuildTools:
    cmake: str
    c_compiler: str
    cxx_compiler: str
    generator: str  # "Unix Makefiles" or "Ninja"


def _which_any(names: Sequence[str]) -> str | None:
    for name in names:
        if name and (found := shutil.which(name)):
            return found
    return None


def find_build_tools() -> BuildTools:
    """cmake, a C and a C++ compiler, and make or ninja; a clear error saying what to install otherwise."""
    cmake = shutil.which("cmake")
    cc = _which_any([os.environ.get("CC", ""), "cc", "gcc", "clang"])
    cxx = _which_any([os.environ.get("CXX", ""), "c++", "g++", "clang++"])
    make, ninja = shutil.which("make"), shutil.which("ninja")
    missing = []
    if not cmake:
        missing.append("cmake")
    if not cc:
        missing.append("a C compiler (cc/gcc/clang)")
    if not cxx:
        missing.append("a C++ compiler (c++/g++/clang++)")
    if not (make or ninja):
        missing.append("make (or ninja)")
    if missing:
        raise MergeqError(
            "building the pinned llama.cpp needs " + ", ".join(missing) + ", not found on PATH",
            hint=INSTALL_HINT,
        )
    return BuildTools(cmake, cc, cxx, "Unix Makefiles" if make else "Ninja")


def _progress_bar():
    from mergeq.core.progress import progress_bar

    return progress_bar()


_MAKE_PERCENT = re.compile(r"^\[\s*(\d+)%\]")
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")


def _cmake_cache_generator(build: Path) -> str | None:
    cache = build / "CMakeCache.txt"
    if not cache.is_file():
        return None
    match = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.*)$", cache.read_text(errors="replace"), re.MULTILINE)
    return match.group(1) if match else None


class _BuildProgress:
    """cmake's percentage on the progress bar, and a log line every 10 points or 30 s (the bar is invisible
    where stderr is not a terminal, and a build that prints nothing for minutes looks hung)."""

    def __init__(self, bar, task, label: str):
        self.bar, self.task, self.label = bar, task, label
        self.started = self.last_time = time.monotonic()
        self.last_percent = -100

    def __call__(self, line: str) -> None:
        log.debug("build: %s", line)
        percent = None
        if match := _MAKE_PERCENT.match(line):
            percent = int(match.group(1))
        elif match := _NINJA_STEP.match(line):
            percent = 100 * int(match.group(1)) // max(1, int(match.group(2)))
        if percent is None:
            return
        self.bar.update(self.task, completed=percent)
        now = time.monotonic()
        if percent >= self.last_percent + 10 or now - self.last_time >= 30:
            self.last_percent, self.last_time = percent, now
            log.info("%s: %d%% after %.0f s", self.label, percent, now - self.started)


def _build(pin: Pin, where: Layout, tools: BuildTools, jobs: int, variant: str = NATIVE) -> None:
    """Configure and build `variant` (reconfiguring the one build tree), then copy the tools into bin/."""
    tree = where.build
    generator = _cmake_cache_generator(tree)
    cache_source = None
    if (tree / "CMakeCache.txt").is_file():
        found = re.search(
            r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", (tree / "CMakeCache.txt").read_text(errors="replace"), re.MULTILINE
        )
        cache_source = found.group(1) if found else None
    if (generator and generator != tools.generator) or (cache_source and Path(cache_source) != where.src):
        shutil.rmtree(tree)  # configured for another generator or tree: start clean
    hint = INSTALL_HINT + "; run with -v to see the whole build log"
    env = {"CC": tools.c_compiler, "CXX": tools.cxx_compiler}
    label = f"llama.cpp {pin.version} ({variant})"
    with _progress_bar() as bar:
        task = bar.add_task(f"{label}: configure", total=100)
        run_tool(
            ToolCommand(
                "cmake (configure llama.cpp)",
                (
                    tools.cmake,
                    "-S",
                    str(where.src),
                    "-B",
                    str(tree),
                    "-G",
                    tools.generator,
                    *pin.cmake_args,
                    *variant_cmake_args(variant),
                ),
                env=env,
            ),
            on_line=lambda line: log.debug("cmake: %s", line),
            hint=hint,
        )
        bar.update(task, description=f"{label}: build {', '.join(pin.targets)}", completed=0)
        run_tool(
            ToolCommand(
                "cmake --build (llama.cpp)",
                (tools.cmake, "--build", str(tree), "--config", "Release", "-j", str(jobs), "--target", *pin.targets),
                env=env,
            ),
            on_line=_BuildProgress(bar, task, f"building {label}"),
            hint=hint,
        )
        bar.update(task, completed=100)
    where.bin.mkdir(parents=True, exist_ok=True)
    for name in pin.targets:
        built = tree / "bin" / name
        if not built.is_file():
            raise ToolError(
                f"the llama.cpp build finished but {built} is missing",
                hint=f"delete {where.root} and run mergeq setup-llamacpp again",
            )
        with atomic_file(where.bin / name) as out, open(built, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 22)
        os.chmod(where.bin / name, 0o755)


def ensure_built(
    pin: Pin | None = None, *, sdist: Path | None = None, jobs: int | None = None, variant: str = "auto"
) -> Layout:
    """Everything `mergeq setup-llamacpp` does: fetch, verify, extract, build, smoke-test, stamp.

    `variant` "auto" builds native first and falls back to portable once if a tool dies by a signal in the
    smoke test; "native" or "portable" builds only that one. Idempotent and locked.
    """
    pin = pin or load_pin()
    if variant != "auto":
        variant_cmake_args(variant)  # an unknown name fails here, before any work
    where = layout(pin)
    if is_built(pin) and variant in ("auto", built_variant(where)):
        return where
    tools = find_build_tools()  # fail before downloading anything
    with setup_lock(where):
        if is_built(pin) and variant in ("auto", built_variant(where)):  # another process finished it
            return where
        started = time.perf_counter()
        fetch_source(pin, where, sdist)
        stamp = read_stamp(where)
        if stamp is not None and stamp.get("cpu") != cpu_fingerprint():
            log.info("the cached llama.cpp build is for another CPU; rebuilding it from scratch")
            shutil.rmtree(where.build, ignore_errors=True)
        where.stamp.unlink(missing_ok=True)
        order = [NATIVE, PORTABLE] if variant == "auto" else [variant]
        rejected: list[dict] = []
        for name in order:
            log.info(
                "building llama.cpp %s (%s), %s variant, in %s; this takes a few minutes, once",
                pin.version,
                pin.commit,
                name,
                where.build,
            )
            _build(pin, where, tools, jobs or os.cpu_count() or 2, name)
            smoke = smoke_test(where, pin)
            if smoke.passed:
                if variant != "auto":
                    reason = f"asked for with --variant {variant}"
                elif rejected:
                    reason = (
                        "the " + " and ".join(r["variant"] for r in rejected) + " build failed its smoke "
                        "test: " + "; ".join(r["summary"] for r in rejected)
                    )
                else:
                    reason = "first choice"
                write_json(
                    where.stamp,
                    {
                        "pin": _stamp_content(pin),
                        "cpu": cpu_fingerprint(),
                        "generator": tools.generator,
                        "compiler": tools.cxx_compiler,
                        "seconds": round(time.perf_counter() - started, 1),
                        "variant": {"name": name, "cmake_args": list(variant_cmake_args(name)), "reason": reason},
                        "rejected": rejected,
                        "smoke": smoke.as_json(),
                    },
                )
                log.info(
                    "llama.cpp %s ready in %s (%s variant; smoke test %s)",
                    pin.version,
                    where.bin,
                    name,
                    smoke.summary(),
                )
                return where
            rejected.append({"variant": name, "summary": smoke.summary(), "smoke": smoke.as_json()})
            if not any(check.died_by_signal for check in smoke.failed) or name == order[-1]:
                break
            log.warning(
                "the %s llama.cpp build failed its smoke test (%s); building it once more with a "
                "portable instruction set (this CPU's extensions named one by one, AMX off)",
                name,
                smoke.summary(),
            )
        details = "\n".join(f"  {r['variant']}: {r['summary']}" for r in rejected)
        raise ToolError(
            f"the pinned llama.cpp was built but its tools fail on a tiny model made on the spot:\n{details}",
            hint="run mergeq setup-llamacpp --rebuild -v to see the whole build and test log"
            + ("" if variant != "auto" else "; try --variant portable or --variant native"),
        )


def tool_path(name: str) -> Path:
    """Absolute path of a built pinned tool (one of the pin's targets: "llama-quantize", "llama-perplexity",
    "llama-imatrix", "llama-server").

    Builds llama.cpp on first use.
    """
    pin = load_pin()
    if name not in pin.targets:
        raise MergeqError(
            f"{name!r} is not one of the pinned llama.cpp tools", hint=f"use one of {', '.join(pin.targets)}"
        )
    return ensure_built(pin).bin / name


def tool_command(name: str, *args: str | os.PathLike) -> ToolCommand:
    """A ToolCommand for a pinned tool, ready for run_tool."""
    return ToolCommand(name, (str(tool_path(name)), *(str(a) for a in args)))
