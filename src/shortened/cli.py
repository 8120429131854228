"""The ``shortened`` command line: parsing and dispatch only.

Each command lives in ``shortened.commands.<name>`` with ``add_parser(subparsers)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from collections.abc import Sequence

from .errors import ShortenedError

#: Command modules, in the order ``--help`` lists them.
COMMANDS = ("info", "plan", "score", "prune", "eval", "heal", "bench", "generate", "export", "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortened",
        description="Depth pruning for Hugging Face causal LMs: score blocks, remove them, heal, evaluate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'shortened COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"shortened.commands.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shortened`` console script; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    # The command as typed, for the records a run writes (reproducing it needs the exact line).
    args.command_line = shlex.join(["shortened", *(sys.argv[1:] if argv is None else map(str, argv))])
    try:
        if getattr(args, "no_progress", False):
            _hide_library_progress_bars()
        if getattr(args, "device", None) is not None:  # every command: a bad device fails before any work
            from .loading import check_device

            check_device(args.device)
        return int(args.func(args) or 0)
    except ShortenedError as exc:
        print(f"shortened {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shortened {args.command}: interrupted", file=sys.stderr)
        return 130


def _hide_library_progress_bars() -> None:
    """--no-progress: the libraries' own bars too (loading and writing weights, Hub files, dataset maps)."""
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shortened")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
