"""The pinned llama.cpp source: the sdist fetched (from a local copy or with pip), checked against the pin's
sha256, and its vendored llama.cpp tree extracted into the cache, atomically and under the setup lock."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from exporters.llamacpp.layout import Layout, has_source, layout, setup_lock
from exporters.llamacpp.pin import PIN_FILE, Pin, load_pin
from exporters.llamacpp.run import ToolCommand, run_tool
from mergeq.core.atomic import atomic_dir, atomic_file
from mergeq.core.errors import MergeqError
from mergeq.core.hashing import sha256_file

log = logging.getLogger(__name__)

SDIST_ENV = "MERGEQ_LLAMACPP_SDIST"  # a local copy of the pinned sdist (offline machines); still sha256-checked


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
                raise MergeqError(
                    f"llama.cpp source package {source} does not exist",
                    hint=f"unset {SDIST_ENV} to download {pin.requirement} with pip",
                )
            candidate = Path(source)
        else:
            log.info("downloading %s (source distribution) with pip", pin.requirement)
            run_tool(
                ToolCommand(
                    "pip download",
                    (
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--no-binary",
                        ":all:",
                        "--disable-pip-version-check",
                        "--dest",
                        tmp,
                        pin.requirement,
                    ),
                ),
                hint=f"check the network connection to PyPI, or set {SDIST_ENV} to a local copy of {pin.filename}",
            )
            found = sorted(Path(tmp).glob("*.tar.gz"))
            if len(found) != 1:
                raise MergeqError(
                    f"pip download of {pin.requirement} produced {[p.name for p in found]}, expected {pin.filename}"
                )
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
            relative = member.name[len(prefix) :]
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
        fetch_source(pin, where, sdist)
    return where


def fetch_source(pin: Pin, where: Layout, sdist: Path | None = None) -> None:
    """With the setup lock held: fetch, verify and extract the pinned tree unless it is there."""
    if not has_source(pin):
        archive = fetch_sdist(pin, where, sdist)
        log.info("extracting %s from %s", pin.tree, archive.name)
        extract_tree(pin, archive, where)
