"""Run hostile cases and faults through the `mergeq` CLI and judge the outcome the same way everywhere.

A case passes when mergeq exits nonzero with a message that contains every expected fragment (the file, tensor
or key), prints no Python traceback, leaves nothing behind (no output directory, no temporary file: the corpus
tree is compared before and after), and loses nothing (every file that existed before is byte-identical after).
Used by tests/hostile/test_*.py and by scripts/hostile_report.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mergeq.core.hashing import sha256_file, tree_hashes

REPO = Path(__file__).resolve().parents[2]
WIDE = {"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}  # rich must not wrap paths across lines
TRACEBACK = "Traceback (most recent call last)"
DOC_FILES = {"report.json", "report.md", "README.md", "summary.json", "summary.md", "summary.png"}


@dataclass
class Outcome:
    name: str
    group: str
    what: str
    code: int | None = None
    output: str = ""
    missing: list[str] = field(default_factory=list)  # expected fragments not in the message
    leftovers: list[str] = field(default_factory=list)  # new paths after the run (outputs, temp files)
    lost: list[str] = field(default_factory=list)  # paths that existed before and changed or vanished
    problems: list[str] = field(default_factory=list)  # anything else that went wrong

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.output

    @property
    def clear(self) -> bool:
        """A clear error: nonzero exit, every expected fragment, no traceback."""
        return self.code not in (0, None) and not self.missing and not self.traceback

    @property
    def ok(self) -> bool:
        return self.clear and not self.leftovers and not self.lost and not self.problems

    def explain(self) -> str:
        parts = [f"{self.name}: exit {self.code}"]
        if self.missing:
            parts.append(f"missing fragments {self.missing}")
        if self.traceback:
            parts.append("printed a traceback")
        if self.leftovers:
            parts.append(f"left behind {self.leftovers[:5]}")
        if self.lost:
            parts.append(f"changed or removed {self.lost[:5]}")
        parts += self.problems
        return "; ".join(parts) + "\n--- output ---\n" + self.output[-4000:]


def flat(text: str) -> str:
    return " ".join(text.split())


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under `roots`: files by content hash, directories and links by kind (links not followed)."""
    state: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        state[str(root)] = "dir"
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                path = Path(dirpath, name)
                state[str(path)] = "link" if path.is_symlink() else "dir"
            for name in filenames:
                path = Path(dirpath, name)
                state[str(path)] = "link" if path.is_symlink() else sha256_file(path)
    return state


def compare(before: dict[str, str], after: dict[str, str]) -> tuple[list[str], list[str]]:
    """(new paths, paths changed or removed)."""
    new = sorted(p for p in after if p not in before)
    lost = sorted(p for p, digest in before.items() if after.get(p) != digest)
    return new, lost


@contextlib.contextmanager
def patched_env(changes: dict[str, str]):
    saved = {k: os.environ.get(k) for k in (*changes, "MERGEQ_QUIET")}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_inprocess(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """`mergeq ARGV` through mergeq.cli.main in this process; (exit code, stdout + stderr)."""
    from mergeq.cli import main

    out, err = io.StringIO(), io.StringIO()
    with patched_env({**WIDE, **(env or {})}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as stop:  # argparse usage errors
            code = stop.code if isinstance(stop.code, int) else 2
        except BaseException as exc:  # noqa: BLE001 - an escaped exception is itself a failure to report
            import traceback

            err.write("".join(traceback.format_exception(exc)))
            code = None
    return code, out.getvalue() + err.getvalue()


def mergeq_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "mergeq.cli", *argv]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **WIDE, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_subprocess(argv: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    proc = subprocess.run(
        mergeq_command(*argv),
        env=subprocess_env(**(env or {})),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


def check_fragments(output: str, expect: list[str]) -> list[str]:
    text = flat(output)
    return [frag for frag in expect if not any(flat(alt) in text for alt in frag.split("|"))]


def run_case(case, root: Path, *, in_process: bool = True) -> Outcome:
    """One corpus case (make_corpus.Case) through the CLI, judged against the corpus tree before and after."""
    root = Path(root)
    before = snapshot(root)
    runner = run_inprocess if in_process else run_subprocess
    code, output = runner(case.argv, case.env)
    after = snapshot(root)
    new, lost = compare(before, after)
    outcome = Outcome(case.name, case.group, case.what, code, output, check_fragments(output, case.expect), new, lost)
    for path in case.absent:
        if Path(path).exists() or Path(path).is_symlink():
            if path not in outcome.leftovers:
                outcome.leftovers.append(path)
    return outcome


def model_files(out: Path) -> dict[str, str]:
    """Hashes of an output tree's artifacts: everything but reports, cards, summaries and the state dir."""
    return {
        rel: digest for rel, digest in tree_hashes(out, skip={".mergeq"}).items() if Path(rel).name not in DOC_FILES
    }


def temp_leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*") if ".tmp-" in p.name)
