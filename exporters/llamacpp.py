"""The pinned llama.cpp: fetched as a PyPI sdist, verified, built once into the cache, run with clear errors.

The pin lives in third_party/llama.cpp.toml (package, version, sha256, the llama.cpp commit it carries,
cmake arguments, the quantization type names). Layout under `cache_root()/llama.cpp/<version>/`:

    download/<sdist>   the verified source distribution (kept, so a rebuild needs no network)
    src/               its vendor/llama.cpp tree: convert_hf_to_gguf.py, conversion/, gguf-py/, tools/
    build/             the cmake build tree
    bin/               llama-quantize, llama-perplexity, llama-imatrix
    build.json         written last: the stamp that says the build above is complete and for which pin

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

from mergeq.atomic import atomic_dir, atomic_file, write_json
from mergeq.errors import MergeqError, ToolError
from mergeq.locks import exclusive
from mergeq.memory import ChildPeak
from mergeq.hashing import sha256_file
from mergeq.paths import cache_root

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
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:16]


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
        from mergeq import faults  # inert unless MERGEQ_FAULT names this tool (hostile-input tests)

        proc = subprocess.Popen(
            faults.tool_argv(command.name, command.argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=command.cwd,
            text=True, errors="replace", bufsize=1,
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
        proc.kill()
        proc.wait()
        raise
    finally:
        for reader in readers:
            reader.join()
    result = ToolResult("".join(out_lines), "".join(err_lines), time.perf_counter() - started, peak)
    if code != 0:
        raise tool_failure(command.name, code, result, hint=hint)
    return result


def tool_failure(name: str, code: int, result: ToolResult, *, hint: str | None = None) -> ToolError:
    tail_source = result.stderr if result.stderr.strip() else result.stdout
    tail = [line for line in tail_source.splitlines() if line.strip()][-STDERR_TAIL:]
    how = f"was killed by signal {-code}" if code < 0 else f"failed with exit code {code}"
    quoted = "\n".join(f"    | {line}" for line in tail) or "    | (no output)"
    return ToolError(f"{name} {how}; its last output lines:\n{quoted}", hint=hint)


# ----------------------------------------------------------------------------------------------- setup


def _progress_bar():
    from mergeq.progress import progress_bar

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


def _build(pin: Pin, where: Layout, tools: BuildTools, jobs: int) -> None:
    generator = _cmake_cache_generator(where.build)
    cache_source = None
    if (where.build / "CMakeCache.txt").is_file():
        found = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$",
                          (where.build / "CMakeCache.txt").read_text(errors="replace"), re.MULTILINE)
        cache_source = found.group(1) if found else None
    if (generator and generator != tools.generator) or (cache_source and Path(cache_source) != where.src):
        shutil.rmtree(where.build)  # configured for another generator or tree: start clean
    hint = INSTALL_HINT + "; run with -v to see the whole build log"
    env = {"CC": tools.c_compiler, "CXX": tools.cxx_compiler}
    with _progress_bar() as bar:
        task = bar.add_task(f"llama.cpp {pin.version}: configure", total=100)
        run_tool(ToolCommand("cmake (configure llama.cpp)", (
            tools.cmake, "-S", str(where.src), "-B", str(where.build), "-G", tools.generator, *pin.cmake_args),
            env=env), on_line=lambda line: log.debug("cmake: %s", line), hint=hint)
        bar.update(task, description=f"llama.cpp {pin.version}: build {', '.join(pin.targets)}", completed=0)

        def on_line(line: str) -> None:
            log.debug("build: %s", line)
            if match := _MAKE_PERCENT.match(line):
                bar.update(task, completed=int(match.group(1)))
            elif match := _NINJA_STEP.match(line):
                bar.update(task, completed=100 * int(match.group(1)) // max(1, int(match.group(2))))

        run_tool(ToolCommand("cmake --build (llama.cpp)", (
            tools.cmake, "--build", str(where.build), "--config", "Release", "-j", str(jobs),
            "--target", *pin.targets), env=env), on_line=on_line, hint=hint)
        bar.update(task, completed=100)
    where.bin.mkdir(parents=True, exist_ok=True)
    for name in pin.targets:
        built = where.build / "bin" / name
        if not built.is_file():
            raise ToolError(f"the llama.cpp build finished but {built} is missing", hint="delete "
                            f"{where.root} and run mergeq setup-llamacpp again")
        with atomic_file(where.bin / name) as out, open(built, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 22)
        os.chmod(where.bin / name, 0o755)


def ensure_built(pin: Pin | None = None, *, sdist: Path | None = None, jobs: int | None = None) -> Layout:
    """Everything `mergeq setup-llamacpp` does: fetch, verify, extract, build, stamp. Idempotent and locked."""
    pin = pin or load_pin()
    where = layout(pin)
    if is_built(pin):
        return where
    tools = find_build_tools()  # fail before downloading anything
    with setup_lock(where):
        if is_built(pin):  # another process finished it while we waited
            return where
        started = time.perf_counter()
        if not has_source(pin):
            archive = fetch_sdist(pin, where, sdist)
            log.info("extracting %s from %s", pin.tree, archive.name)
            extract_tree(pin, archive, where)
        stamp = read_stamp(where)
        if stamp is not None and stamp.get("cpu") != cpu_fingerprint() and where.build.exists():
            log.info("the cached llama.cpp build is for another CPU; rebuilding it from scratch")
            shutil.rmtree(where.build)
        where.stamp.unlink(missing_ok=True)
        log.info("building llama.cpp %s (%s) in %s; this takes a few minutes, once", pin.version, pin.commit, where.build)
        _build(pin, where, tools, jobs or os.cpu_count() or 2)
        write_json(where.stamp, {
            "pin": _stamp_content(pin), "cpu": cpu_fingerprint(), "generator": tools.generator,
            "compiler": tools.cxx_compiler,
            "seconds": round(time.perf_counter() - started, 1),
        })
    log.info("llama.cpp %s ready in %s", pin.version, where.bin)
    return where


# ----------------------------------------------------------------------------------------------- public API


def tool_path(name: str) -> Path:
    """Absolute path of a built pinned tool ("llama-quantize", "llama-perplexity", "llama-imatrix").

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


def doctor_rows() -> list[tuple[str, str]]:
    """Rows for `mergeq doctor`: pin, source, build and each tool. Never builds anything."""
    try:
        pin = load_pin()
    except MergeqError as err:
        return [("llama.cpp", f"[red]{err}")]
    where = layout(pin)
    rows = [("llama.cpp pin", f"{pin.requirement} (llama.cpp {pin.commit}, gguf-py {pin.gguf_py_version})")]
    rows.append(("llama.cpp source", str(where.src) if has_source(pin) else "[yellow]not fetched: run mergeq setup-llamacpp"))
    if is_built(pin):
        stamp = read_stamp(where) or {}
        rows.append(("llama.cpp build", f"built in {where.bin} ({stamp.get('seconds', '?')} s, {stamp.get('compiler', '?')})"))
        for name in pin.targets:
            rows.append((f"llama.cpp tool: {name}", str(where.bin / name)))
    else:
        rows.append(("llama.cpp build", "[yellow]not built: run mergeq setup-llamacpp (or it builds on first GGUF export)"))
        try:
            find_build_tools()
            rows.append(("llama.cpp build tools", "cmake, C/C++ compilers and make/ninja found"))
        except MergeqError as err:
            rows.append(("llama.cpp build tools", f"[red]{err}"))
    return rows
