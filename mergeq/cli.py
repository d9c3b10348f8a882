"""The `mergeq` command line: discovers subcommands in mergeq.commands and turns errors into messages."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from mergeq import __version__, commands
from mergeq.core.errors import MergeqError
from mergeq.core.progress import QUIET_ENV, stderr_console

log = logging.getLogger("mergeq")

EXIT_OK = 0
EXIT_USAGE = 2  # bad input or options (MergeqError)
EXIT_TOOL = 3  # an external tool failed (ToolError)
EXIT_INTERRUPTED = 130
EXIT_BUG = 70  # an unexpected exception: a bug in mergeq


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeq", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mergeq {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def setup_logging(quiet: bool, verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=stderr_console(), show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    quiet = args.quiet or getattr(args, "json", False)
    if quiet:
        os.environ[QUIET_ENV] = "1"
    setup_logging(quiet, args.verbose)
    try:
        return int(args.run(args) or EXIT_OK)
    except MergeqError as err:
        log.error("%s", err)
        return err.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except Exception:
        log.exception("mergeq hit an unexpected error (a bug): please report it with the traceback above")
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
