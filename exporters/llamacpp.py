"""The pinned llama.cpp: fetched as a PyPI sdist, verified, built once into the cache, run with clear errors.

The pin lives in third_party/llama.cpp.toml (package, version, sha256, the llama.cpp commit it carries,
cmake arguments, the quantization type names). Layout under `cache_root()/llama.cpp/<version>/`:

    download/<sdist>   the verified source distribution (kept, so a rebuild needs no network)
    src/               its vendor/llama.cpp tree: convert_hf_to_gguf.py, conversion/, gguf-py/, tools/
    build/             the cmake build tree, one for both variants: the instruction set reaches only ggml's
                       CPU backend, so switching variants recompiles that library and relinks
    bin/               llama-quantize, llama-perplexity, llama-imatrix, llama-server
    build.json         written last: the stamp that says the build above is complete, for which pin and CPU,
                       which variant it is and why, and that it passed the smoke test

A build proves itself before it is stamped: `smoke_test` makes a tiny GGUF on the spot and runs every tool
on it (quantize to Q8_0, perplexity, imatrix; --version for the others). The "native" variant
(-march=native) is tried first; if a tool dies by a signal there, the tree is built once more as
"portable" (the CPU's own extensions named one by one, AMX off) and that is used if it passes.

Setup runs under an exclusive file lock (`<version>.lock` next to that directory), so concurrent mergeq
processes build once; a complete stamp means nothing is rebuilt. Every tool runs through `run_tool`,
which turns a failure into ToolError naming the tool and quoting its last stderr lines.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from mergeq.core.atomic import atomic_dir, atomic_file, write_json
from mergeq.core.errors import MergeqError, ToolError
from mergeq.core.locks import exclusive
from mergeq.core.memory import ChildPeak
from mergeq.core.hashing import sha256_file
from mergeq.core.paths import cache_root

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = REPO_ROOT / "third_party" / "llama.cpp.toml"
SDIST_ENV = "MERGEQ_LLAMACPP_SDIST"  # a local copy of the pinned sdist (offline machines); still sha256-checked
STAMP_NAME = "build.json"
ARCHITECTURES_NAME = "text_architectures.json"
STDERR_TAIL = 15  # lines of a failed tool's stderr quoted in the error
INSTALL_HINT = "install them with: apt-get install cmake g++ make   (or: pip install cmake, plus a C++ compiler)"


# ----------------------------------------------------------------------------------------------- the pin


@dataclass(frozen=True)
class Pin:
    """third_party/llama.cpp.toml, validated."""

    package: str
    version: str
    filename: str
    sha256: str
    tree: str
    repository: str
    commit: str
    gguf_py_version: str
    targets: tuple[str, ...]
    cmake_args: tuple[str, ...]
    quant_types: tuple[str, ...]
    needs_imatrix: frozenset[str]
    default_types: dict[str, str] = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as handle:
        return tomllib.load(handle)


@lru_cache(maxsize=4)
def load_pin(path: Path = PIN_FILE) -> Pin:
    if not Path(path).is_file():
        raise MergeqError(f"the llama.cpp pin {path} is missing", hint="run mergeq from its source checkout")
    data = _load_toml(Path(path))
    try:
        source, llama, build, quant = data["source"], data["llama_cpp"], data["build"], data["quantize"]
        return Pin(
            package=source["package"], version=source["version"], filename=source["filename"],
            sha256=source["sha256"].lower(), tree=source["tree"].strip("/"),
            repository=llama["repository"], commit=llama["commit"], gguf_py_version=llama["gguf_py_version"],
            targets=tuple(build["targets"]), cmake_args=tuple(build["cmake_args"]),
            quant_types=tuple(quant["types"]), needs_imatrix=frozenset(quant["needs_imatrix"]),
            default_types=dict(quant.get("default_type", {})),
        )
    except KeyError as err:
        raise MergeqError(f"{path}: missing key {err}", hint="restore third_party/llama.cpp.toml from git") from err


# ----------------------------------------------------------------------------------------------- cache layout


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def download(self) -> Path:
        return self.root / "download"

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def stamp(self) -> Path:
        return self.root / STAMP_NAME

    @property
    def lock(self) -> Path:
        return self.root.with_name(self.root.name + ".lock")

    @property
    def converter(self) -> Path:
        return self.src / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.src / "gguf-py"


def layout(pin: Pin | None = None) -> Layout:
    pin = pin or load_pin()
    return Layout(cache_root() / "llama.cpp" / pin.version)


def setup_lock(where: Layout):
    """Exclusive across processes: one setup at a time; the others wait, then find it done."""
    return exclusive(where.lock, f"another mergeq process is setting up llama.cpp in {where.root}; waiting for it")


# ----------------------------------------------------------------------------------------------- build state


def _stamp_content(pin: Pin) -> dict:
    return {
        "package": pin.package, "version": pin.version, "sha256": pin.sha256, "commit": pin.commit,
        "cmake_args": list(pin.cmake_args), "targets": list(pin.targets),
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


def variant_cmake_args(variant: str, flags: frozenset[str] | None = None, machine: str | None = None) -> tuple[str, ...]:
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


def read_stamp(where: Layout) -> dict | None:
    try:
        return json.loads(where.stamp.read_text())
    except (OSError, ValueError):
        return None


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


def has_source(pin: Pin | None = None) -> bool:
    where = layout(pin)
    return where.converter.is_file() and (where.gguf_py / "gguf" / "__init__.py").is_file()


# ----------------------------------------------------------------------------------------------- build tools


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


# ----------------------------------------------------------------------------------------------- running tools


@dataclass(frozen=True)
class ToolCommand:
    """One external command: `name` is what errors call it (e.g. "llama-quantize")."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str | None] | None = None  # changes to os.environ: a value, or None to unset
    cwd: Path | None = None


@dataclass
class ToolResult:
    stdout: str
    stderr: str
    seconds: float
    peak_rss_bytes: int = 0


def run_tool(
    command: ToolCommand,
    *,
    on_line: Callable[[str], None] | None = None,
    hint: str | None = None,
) -> ToolResult:
    """Run `command`, capturing stdout and stderr (each line also handed to `on_line`).

    A non-zero exit, a signal or a missing executable raises ToolError naming the tool, with its last
    stderr lines (stdout's when stderr is empty: llama.cpp logs to either). Ctrl-C stops the tool too.
    """
    env = None
    if command.env:
        env = dict(os.environ)
        for key, value in command.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
    started = time.perf_counter()
    try:
        from mergeq.core import faults  # inert unless MERGEQ_FAULT names this tool (hostile-input tests)

        proc = subprocess.Popen(
            faults.tool_argv(command.name, command.argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=command.cwd,
            text=True, errors="replace", bufsize=1, start_new_session=True, preexec_fn=die_with_parent,
        )
    except FileNotFoundError as err:
        raise ToolError(f"{command.name}: cannot run {command.argv[0]}: not found", hint=hint) from err
    except PermissionError as err:
        raise ToolError(f"{command.name}: cannot run {command.argv[0]}: not executable", hint=hint) from err

    out_lines: list[str] = []
    err_lines: list[str] = []

    def pump(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            if on_line is not None:
                with contextlib.suppress(Exception):
                    on_line(line.rstrip("\n"))

    memory = ChildPeak(proc.pid)
    readers = [threading.Thread(target=pump, args=(proc.stdout, out_lines), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err_lines), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # like proc.wait(), plus rusage as a fallback for the peak
        code = proc.returncode = os.waitstatus_to_exitcode(status)
        peak = memory.finish(usage.ru_maxrss)
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        for reader in readers:
            reader.join()
    result = ToolResult("".join(out_lines), "".join(err_lines), time.perf_counter() - started, peak)
    if code != 0:
        raise tool_failure(command.name, code, result, hint=hint)
    return result


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the mergeq thread that started it dies, so a
    `kill -9` of mergeq leaves no llama.cpp tool running (the tool has its own process group, so the
    terminal's Ctrl-C reaches it only through mergeq, which then stops the group)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(137)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.kill()
    proc.wait()


# What a tool's death by each signal means, as far as the signal alone tells (never the input's fault
# unless the tool said so): (what happened, what to do or None to keep the caller's hint).
REBUILD_HINT = ("rebuild it: mergeq setup-llamacpp --rebuild (the build tests itself and falls back to a portable "
                "instruction set), or force that variant: mergeq setup-llamacpp --rebuild --variant portable")
SIGNAL_MEANINGS: dict[int, tuple[str, str | None]] = {
    signal.SIGILL: ("the CPU rejected an instruction of this llama.cpp build (an illegal instruction): the "
                    "build does not match this processor; the input file is not the cause", REBUILD_HINT),
    signal.SIGKILL: ("SIGKILL comes from outside the tool: another process, or the kernel (its out-of-memory "
                     "killer logs to dmesg when it is the one)", None),
    signal.SIGSEGV: ("the tool made an invalid memory access", None),
    signal.SIGBUS: ("a memory-mapped file could not be read: it was truncated while in use, or the disk failed", None),
    signal.SIGABRT: ("the tool aborted itself on a failed check; its last lines say which", None),
    signal.SIGTERM: ("the tool was asked to stop, from outside", None),
    signal.SIGINT: ("the tool was interrupted", None),
}


def describe_exit(code: int) -> tuple[str, str | None]:
    """A tool's exit status in words, and the hint its cause calls for (None: no known one)."""
    if code >= 0:
        return f"failed with exit code {code}", None
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    meaning, hint = SIGNAL_MEANINGS.get(-code, (None, None))
    how = f"was killed by signal {-code} ({name})"
    return (f"{how}: {meaning}" if meaning else how), hint


def quoted_tail(result: ToolResult, lines: int = STDERR_TAIL) -> str:
    """A tool's last non-blank output lines (stderr's, or stdout's when stderr is empty: llama.cpp logs to
    either), indented and marked for an error message."""
    source = result.stderr if result.stderr.strip() else result.stdout
    tail = [line for line in source.splitlines() if line.strip()][-lines:]
    return "\n".join(f"    | {line}" for line in tail) or "    | (no output)"


def tool_failure(name: str, code: int, result: ToolResult, *, hint: str | None = None) -> ToolError:
    how, known_hint = describe_exit(code)
    error = ToolError(f"{name} {how}; its last output lines:\n{quoted_tail(result)}", hint=known_hint or hint)
    error.returncode = code
    return error


# ----------------------------------------------------------------------------------------------- build, test, stamp


def _progress_bar():
    from mergeq.core.progress import progress_bar

    return progress_bar()


def fetch_sdist(pin: Pin, where: Layout, sdist: Path | None = None) -> Path:
    """The verified sdist in download/: from `sdist`, $MERGEQ_LLAMACPP_SDIST, or `pip download`."""
    final = where.download / pin.filename
    if final.is_file() and sha256_file(final) == pin.sha256:
        return final
    source = sdist or (Path(os.environ[SDIST_ENV]) if os.environ.get(SDIST_ENV) else None)
    where.download.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=where.download) as tmp:
        if source is not None:
            if not Path(source).is_file():
                raise MergeqError(f"llama.cpp source package {source} does not exist",
                                  hint=f"unset {SDIST_ENV} to download {pin.requirement} with pip")
            candidate = Path(source)
        else:
            log.info("downloading %s (source distribution) with pip", pin.requirement)
            run_tool(
                ToolCommand("pip download", (
                    sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--disable-pip-version-check", "--dest", tmp, pin.requirement)),
                hint=f"check the network connection to PyPI, or set {SDIST_ENV} to a local copy of {pin.filename}",
            )
            found = sorted(Path(tmp).glob("*.tar.gz"))
            if len(found) != 1:
                raise MergeqError(f"pip download of {pin.requirement} produced {[p.name for p in found]}, "
                                  f"expected {pin.filename}")
            candidate = found[0]
        digest = sha256_file(candidate)
        if digest != pin.sha256:
            raise MergeqError(
                f"{candidate}: sha256 {digest} does not match the pin {pin.sha256} in {PIN_FILE.name}",
                hint="the file is corrupt or not the pinned release; delete it and run mergeq setup-llamacpp again",
            )
        with atomic_file(final) as out, open(candidate, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 22)
    return final


def extract_tree(pin: Pin, sdist: Path, where: Layout) -> None:
    """Extract only the sdist's vendored llama.cpp tree into src/ (atomically)."""
    with tarfile.open(sdist, "r:gz") as archive:
        members = archive.getmembers()
        top = members[0].name.split("/", 1)[0]
        prefix = f"{top}/{pin.tree}/"
        chosen = []
        for member in members:
            if not member.name.startswith(prefix) or not (member.isfile() or member.isdir()):
                continue
            relative = member.name[len(prefix):]
            if not relative or relative.startswith("/") or ".." in Path(relative).parts:
                continue
            member.name = relative
            chosen.append(member)
        if not chosen:
            raise MergeqError(f"{sdist} has no {pin.tree}/ tree", hint="the pin's `tree` does not match this sdist")
        with atomic_dir(where.src, overwrite=True) as tmp:
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(tmp, members=chosen, **kwargs)
    if not has_source(pin):
        raise MergeqError(f"{sdist}: the extracted tree has no convert_hf_to_gguf.py or gguf-py")


def ensure_source(pin: Pin | None = None, *, sdist: Path | None = None) -> Layout:
    """Download, verify and extract the pinned tree if needed (no build). Returns the layout."""
    pin = pin or load_pin()
    where = layout(pin)
    if has_source(pin):
        return where
    with setup_lock(where):
        if not has_source(pin):
            archive = fetch_sdist(pin, where, sdist)
            log.info("extracting %s from %s", pin.tree, archive.name)
            extract_tree(pin, archive, where)
    return where


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
        found = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$",
                          (tree / "CMakeCache.txt").read_text(errors="replace"), re.MULTILINE)
        cache_source = found.group(1) if found else None
    if (generator and generator != tools.generator) or (cache_source and Path(cache_source) != where.src):
        shutil.rmtree(tree)  # configured for another generator or tree: start clean
    hint = INSTALL_HINT + "; run with -v to see the whole build log"
    env = {"CC": tools.c_compiler, "CXX": tools.cxx_compiler}
    label = f"llama.cpp {pin.version} ({variant})"
    with _progress_bar() as bar:
        task = bar.add_task(f"{label}: configure", total=100)
        run_tool(ToolCommand("cmake (configure llama.cpp)", (
            tools.cmake, "-S", str(where.src), "-B", str(tree), "-G", tools.generator, *pin.cmake_args,
            *variant_cmake_args(variant)), env=env), on_line=lambda line: log.debug("cmake: %s", line), hint=hint)
        bar.update(task, description=f"{label}: build {', '.join(pin.targets)}", completed=0)
        run_tool(ToolCommand("cmake --build (llama.cpp)", (
            tools.cmake, "--build", str(tree), "--config", "Release", "-j", str(jobs),
            "--target", *pin.targets), env=env), on_line=_BuildProgress(bar, task, f"building {label}"), hint=hint)
        bar.update(task, completed=100)
    where.bin.mkdir(parents=True, exist_ok=True)
    for name in pin.targets:
        built = tree / "bin" / name
        if not built.is_file():
            raise ToolError(f"the llama.cpp build finished but {built} is missing", hint="delete "
                            f"{where.root} and run mergeq setup-llamacpp again")
        with atomic_file(where.bin / name) as out, open(built, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 22)
        os.chmod(where.bin / name, 0o755)


# ----------------------------------------------------------------------------------------------- smoke test

SMOKE_TEXT = ("The quick brown fox jumps over the lazy dog. A merged model is exported, quantized and measured; "
              "every tool of the pinned build runs once on a tiny model before the build is trusted. ") * 4
TINY_WRITER = Path(__file__).resolve().with_name("llamacpp_tiny.py")


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
        return {"passed": self.passed, "checks": [
            {"tool": c.tool, "seconds": round(c.seconds, 2), "error": c.error, "returncode": c.returncode}
            for c in self.checks]}


def write_tiny_gguf(where: Layout, path: Path) -> None:
    """The smoke test's model, written by the pinned gguf-py (exporters/llamacpp_tiny.py)."""
    run_tool(ToolCommand("tiny GGUF writer", (sys.executable, str(TINY_WRITER), str(path)),
                         env=pinned_python_env(where)))


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
            "llama-imatrix": ("-m", q8, "-f", text, "-c", "64", "--chunks", "2", "-t", threads,
                              "-o", work / "imatrix.gguf"),
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
                checks.append(SmokeCheck(name, time.perf_counter() - started, str(err),
                                         getattr(err, "returncode", None)))
            else:
                checks.append(SmokeCheck(name, time.perf_counter() - started))
    return SmokeResult(tuple(checks))


# ----------------------------------------------------------------------------------------------- setup


def ensure_built(pin: Pin | None = None, *, sdist: Path | None = None, jobs: int | None = None,
                 variant: str = "auto") -> Layout:
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
        if not has_source(pin):
            archive = fetch_sdist(pin, where, sdist)
            log.info("extracting %s from %s", pin.tree, archive.name)
            extract_tree(pin, archive, where)
        stamp = read_stamp(where)
        if stamp is not None and stamp.get("cpu") != cpu_fingerprint():
            log.info("the cached llama.cpp build is for another CPU; rebuilding it from scratch")
            shutil.rmtree(where.build, ignore_errors=True)
        where.stamp.unlink(missing_ok=True)
        order = [NATIVE, PORTABLE] if variant == "auto" else [variant]
        rejected: list[dict] = []
        for name in order:
            log.info("building llama.cpp %s (%s), %s variant, in %s; this takes a few minutes, once",
                     pin.version, pin.commit, name, where.build)
            _build(pin, where, tools, jobs or os.cpu_count() or 2, name)
            smoke = smoke_test(where, pin)
            if smoke.passed:
                if variant != "auto":
                    reason = f"asked for with --variant {variant}"
                elif rejected:
                    reason = ("the " + " and ".join(r["variant"] for r in rejected) + " build failed its smoke "
                              "test: " + "; ".join(r["summary"] for r in rejected))
                else:
                    reason = "first choice"
                write_json(where.stamp, {
                    "pin": _stamp_content(pin), "cpu": cpu_fingerprint(), "generator": tools.generator,
                    "compiler": tools.cxx_compiler, "seconds": round(time.perf_counter() - started, 1),
                    "variant": {"name": name, "cmake_args": list(variant_cmake_args(name)), "reason": reason},
                    "rejected": rejected, "smoke": smoke.as_json(),
                })
                log.info("llama.cpp %s ready in %s (%s variant; smoke test %s)", pin.version, where.bin, name,
                         smoke.summary())
                return where
            rejected.append({"variant": name, "summary": smoke.summary(), "smoke": smoke.as_json()})
            if not any(check.died_by_signal for check in smoke.failed) or name == order[-1]:
                break
            log.warning("the %s llama.cpp build failed its smoke test (%s); building it once more with a "
                        "portable instruction set (this CPU's extensions named one by one, AMX off)", name,
                        smoke.summary())
        details = "\n".join(f"  {r['variant']}: {r['summary']}" for r in rejected)
        raise ToolError(
            f"the pinned llama.cpp was built but its tools fail on a tiny model made on the spot:\n{details}",
            hint="run mergeq setup-llamacpp --rebuild -v to see the whole build and test log"
                 + ("" if variant != "auto" else "; try --variant portable or --variant native"),
        )


def built_variant(where: Layout) -> str | None:
    return ((read_stamp(where) or {}).get("variant") or {}).get("name")


# ----------------------------------------------------------------------------------------------- public API


def tool_path(name: str) -> Path:
    """Absolute path of a built pinned tool (one of the pin's targets: "llama-quantize", "llama-perplexity",
    "llama-imatrix", "llama-server").

    Builds llama.cpp on first use.
    """
    pin = load_pin()
    if name not in pin.targets:
        raise MergeqError(f"{name!r} is not one of the pinned llama.cpp tools", hint=f"use one of {', '.join(pin.targets)}")
    return ensure_built(pin).bin / name


def tool_command(name: str, *args: str | os.PathLike) -> ToolCommand:
    """A ToolCommand for a pinned tool, ready for run_tool."""
    return ToolCommand(name, (str(tool_path(name)), *(str(a) for a in args)))


def pinned_python_env(where: Layout | None = None, *extra_paths: Path) -> dict[str, str | None]:
    """Environment changes for a Python subprocess that must import the pinned gguf-py, never the installed
    `gguf`: the pinned gguf-py first on PYTHONPATH, and NO_LOCAL_GGUF unset (the converter then also puts
    its own gguf-py first on sys.path)."""
    where = where or layout()
    paths = [str(where.gguf_py), *(str(p) for p in extra_paths)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(paths), "NO_LOCAL_GGUF": None}


def converter_command(model_dir: Path, outfile: Path, outtype: str = "f16", *extra: str) -> ToolCommand:
    """The pinned convert_hf_to_gguf.py on `model_dir`, writing `outfile`, with the pinned gguf-py."""
    where = ensure_source()
    return ToolCommand(
        "convert_hf_to_gguf.py",
        (sys.executable, str(where.converter), str(model_dir), "--outfile", str(outfile), "--outtype", outtype, *extra),
        env=pinned_python_env(where),
    )


def supported_architectures(pin: Pin | None = None) -> list[str]:
    """The Hugging Face architectures the pinned converter can convert as text models, read statically.

    An architecture is supported when conversion/__init__.py routes it (TEXT_MODEL_MAP) and a class in
    conversion/*.py registers it with `@ModelBase.register(...)` without being a multimodal projector class
    (MmprojModel or model_arch MMPROJ, directly or by inheritance). Only the source is parsed: no converter
    code runs. tests/test_llamacpp.py checks the result against the converter's live registry. The list is
    cached next to the tree (`text_architectures.json`).
    """
    where = ensure_source(pin)
    cached = where.root / ARCHITECTURES_NAME
    with contextlib.suppress(OSError, ValueError):
        return json.loads(cached.read_text())
    found = _scan_architectures(where.src / "conversion")
    write_json(cached, found)
    return found


def _scan_architectures(conversion: Path) -> list[str]:
    routed = set(_literal_assignment(conversion / "__init__.py", "TEXT_MODEL_MAP"))
    classes: dict[str, tuple[list[str], list[str], bool]] = {}  # name -> (bases, registered names, MMPROJ arch)
    for path in sorted(conversion.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = (_base_names(node), _registered_names(node), _declares_mmproj(node))

    def is_mmproj(name: str, seen: frozenset = frozenset()) -> bool:
        if name == "MmprojModel":
            return True
        if name not in classes or name in seen:
            return False
        bases, _, mmproj = classes[name]
        return mmproj or any(is_mmproj(base, seen | {name}) for base in bases)

    registered = {arch for name, (_, names, _) in classes.items() if not is_mmproj(name) for arch in names}
    return sorted(routed & registered)


def _literal_assignment(path: Path, variable: str):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == variable and node.value is not None:
            return ast.literal_eval(node.value)
    raise MergeqError(f"{path}: no {variable} found; the pinned converter's layout changed")


def _base_names(node: ast.ClassDef) -> list[str]:
    return [b.id if isinstance(b, ast.Name) else b.attr for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))]


def _registered_names(node: ast.ClassDef) -> list[str]:
    names = []
    for decorator in node.decorator_list:
        if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                and decorator.func.attr == "register"):
            names += [a.value for a in decorator.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return names


def _declares_mmproj(node: ast.ClassDef) -> bool:
    for stmt in node.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        value = getattr(stmt, "value", None)
        if any(isinstance(t, ast.Name) and t.id == "model_arch" for t in targets) and isinstance(value, ast.Attribute):
            if value.attr == "MMPROJ":
                return True
    return False


def canonical_quant_type(name: str, pin: Pin | None = None) -> str | None:
    """The llama-quantize spelling of a type name (matched case-insensitively), or None if unknown."""
    pin = pin or load_pin()
    lookup = {t.lower(): t for t in pin.quant_types}
    return lookup.get(name.strip().lower())


def version_info() -> dict:
    """What identifies the pinned llama.cpp (static, from the pin: cheap, and the same on every machine)."""
    pin = load_pin()
    return {
        "package": pin.package, "version": pin.version, "sha256": pin.sha256,
        "llama_cpp_commit": pin.commit, "gguf_py_version": pin.gguf_py_version,
    }


def doctor_rows(*, smoke: bool = True) -> list[tuple[str, str]]:
    """Rows for `mergeq doctor`: pin, source, build variant and why, each tool, and (when built and `smoke`)
    a fresh run of the smoke test, so a build that stopped working on this machine shows here. Never builds."""
    try:
        pin = load_pin()
    except MergeqError as err:
        return [("llama.cpp", f"[red]{err}")]
    where = layout(pin)
    rows = [("llama.cpp pin", f"{pin.requirement} (llama.cpp {pin.commit}, gguf-py {pin.gguf_py_version})")]
    rows.append(("llama.cpp source", str(where.src) if has_source(pin) else "[yellow]not fetched: run mergeq setup-llamacpp"))
    if is_built(pin):
        stamp = read_stamp(where) or {}
        variant = stamp.get("variant", {})
        rows.append(("llama.cpp build", f"built in {where.bin} ({stamp.get('seconds', '?')} s, {stamp.get('compiler', '?')})"))
        rows.append(("llama.cpp variant", f"{variant.get('name')}: {variant.get('reason')}"))
        for name in pin.targets:
            rows.append((f"llama.cpp tool: {name}", str(where.bin / name)))
        if smoke:
            result = smoke_test(where, pin)
            rows.append(("llama.cpp smoke test", result.summary() if result.passed else f"[red]FAILED: {result.summary()}; "
                         f"{REBUILD_HINT}"))
    else:
        rows.append(("llama.cpp build", "[yellow]not built: run mergeq setup-llamacpp (or it builds on first GGUF export)"))
        try:
            find_build_tools()
            rows.append(("llama.cpp build tools", "cmake, C/C++ compilers and make/ninja found"))
        except MergeqError as err:
            rows.append(("llama.cpp build tools", f"[red]{err}"))
    return rows
