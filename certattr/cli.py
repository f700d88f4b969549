"""The ``certattr`` command line: one subcommand module per job in ``certattr.commands``.

Each module in ``COMMANDS`` defines ``register(subparsers)`` that adds its parser and sets
``func=run`` with ``run(args) -> int``.  Errors print one line and exit non-zero; ``--debug``
shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# (module under certattr.commands) in the order shown by --help; missing modules are skipped so
# that a partial install still has a working CLI.
COMMANDS = ["train", "explain", "certify", "attack", "campaign", "compare", "report", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certattr",
        description="Certify and attack the robustness of neural-network attributions.",
    )
    parser.add_argument("--version", action="version", version=f"certattr {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"certattr.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"certattr.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("certattr: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, KeyError, RuntimeError, OSError) as exc:
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"certattr {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
