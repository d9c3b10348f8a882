"""`mergeq setup-llamacpp`: fetch, verify and build the pinned llama.cpp into the cache (once)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def run(args) -> int:
    from exporters import llamacpp

    pin = llamacpp.load_pin()
    if args.rebuild:
        where = llamacpp.layout(pin)
        with llamacpp.setup_lock(where):
            where.stamp.unlink(missing_ok=True)
    where = llamacpp.ensure_built(pin, sdist=args.sdist, jobs=args.jobs)
    for name in pin.targets:
        log.info("%s: %s", name, where.bin / name)
    log.info("converter: %s (with gguf-py from %s)", where.converter, where.gguf_py)
    return 0


def register(sub) -> None:
    parser = sub.add_parser(
        "setup-llamacpp",
        help="download, verify and build the pinned llama.cpp (llama-quantize, llama-perplexity, llama-imatrix)")
    parser.add_argument("--sdist", type=Path, metavar="FILE",
                        help="use this local copy of the pinned llama-cpp-python sdist instead of pip download "
                             "(its sha256 is still checked)")
    parser.add_argument("--jobs", type=int, metavar="N", help="parallel compile jobs (default: all cores)")
    parser.add_argument("--rebuild", action="store_true", help="build again even if a complete build is cached")
    parser.set_defaults(run=run)
