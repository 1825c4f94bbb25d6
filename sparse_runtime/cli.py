"""The ``sparse-runtime`` command line: a thin layer over the public API.

Subcommands live in ``sparse_runtime/commands/`` (one module each, discovered here). A
:class:`~sparse_runtime.errors.SparseRuntimeError` prints as one clear line and exit code 2, not a
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Optional

from .errors import SparseRuntimeError


def _commands():
    from . import commands as pkg

    found = []
    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        if hasattr(module, "COMMAND"):
            found.append(module.COMMAND)
    return found


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sparse-runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sparse-runtime {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in _commands():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args._run(args) or 0)
    except SparseRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
