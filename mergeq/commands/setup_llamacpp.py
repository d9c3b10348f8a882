"""`mergeq setup-llamacpp`: fetch, verify and build the pinned llama.cpp into the cache (once)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def run(args) -> int:
    from exporters.llamacpp.build import ensure_built
    from exporters.llamacpp.layout import layout, read_stamp, setup_lock
    from exporters.llamacpp.pin import load_pin

    pin = load_pin()
    if args.rebuild:
        where = layout(pin)
        with setup_lock(where):
            where.stamp.unlink(missing_ok=True)
    where = ensure_built(pin, sdist=args.sdist, jobs=args.jobs, variant=args.variant)
    stamp = read_stamp(where) or {}
    variant = stamp.get("variant", {})
    log.info("variant: %s (%s)", variant.get("name"), variant.get("reason"))
    for name in pin.targets:
        log.info("%s: %s", name, where.bin / name)
    log.info("converter: %s (with gguf-py from %s)", where.converter, where.gguf_py)
    return 0


def register(sub) -> None:
    parser = sub.add_parser(
        "setup-llamacpp",
        help="download, verify, build and smoke-test the pinned llama.cpp (llama-quantize, llama-perplexity, "
        "llama-imatrix, llama-server)",
    )
    parser.add_argument(
        "--sdist",
        type=Path,
        metavar="FILE",
        help="use this local copy of the pinned llama-cpp-python sdist instead of pip download "
        "(its sha256 is still checked)",
    )
    parser.add_argument("--jobs", type=int, metavar="N", help="parallel compile jobs (default: all cores)")
    parser.add_argument("--rebuild", action="store_true", help="build again even if a complete build is cached")
    parser.add_argument(
        "--variant",
        choices=("auto", "native", "portable"),
        default="auto",
        help="instruction set: native (-march=native), portable (this CPU's extensions named one by "
        "one, AMX off), or auto: native, and portable if a tool dies by a signal in the smoke "
        "test (default: auto)",
    )
    parser.set_defaults(run=run)
