"""The ``sparse-runtime`` command line: a thin layer over the public API.

Subcommands live in ``sparse_runtime/commands/`` (one module each, discovered here). A
:class:`~sparse_runtime.errors.SparseRuntimeError` prints as one clear line and exit code 2, not a
traceback; so does a fault of the machine (full disk, read-only output), and anything else prints
one line and exit code 1 (``-v`` for the traceback). See docs/reliability.md.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
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


# plain text: argparse prints it as written (the module docstring is reST for the docs)
DESCRIPTION = ("Prune a language model, repair it, merge to exact sparse weights, export it, and measure\n"
               "whether it runs faster (dense against sparse, on the same engine).")
EPILOG = ("Every COMMAND has --help. Commands that read data (calibration, perplexity, zero-shot,\n"
          "fine-tuning) look in $SPARSE_RUNTIME_DATA or --data-dir (docs/data.md).\n"
          "Example: sparse-runtime prune smollm2-135m --method wanda --sparsity 0.5 --out runs/w50")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sparse-runtime", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sparse-runtime {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in _commands():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


# errno -> (what happened, the fix); the message names the path the system reported
_OS_FAULTS = {
    errno.ENOSPC: ("the disk is full", "free space or choose another --out; the previous output, if any, is untouched"),
    errno.EDQUOT: ("the disk quota is exhausted", "free space or choose another --out"),
    errno.EROFS: ("the file system is read-only", "choose an --out (or cache) on a writable disk"),
    errno.EACCES: ("permission denied", "choose a path you may write, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a path you may write, or fix its permissions"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "fix the path"),
    errno.EISDIR: ("a directory where a file was expected", "give a file path"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.EEXIST: ("the path already exists", "choose another path or remove it"),
}
# the same faults as other libraries word them (safetensors' Rust I/O errors, torch.save's writer)
_TEXT_FAULTS = (("no space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC),
                ("code: 28,", errno.ENOSPC), ("storagefull", errno.ENOSPC),
                ("read-only file system", errno.EROFS), ("os error 30", errno.EROFS),
                ("code: 30,", errno.EROFS), ("readonlyfilesystem", errno.EROFS),
                ("permission denied", errno.EACCES), ("file write failed", errno.ENOSPC))


def os_fault_message(exc: BaseException, out: Optional[str] = None) -> Optional[str]:
    """One line for a system fault (full disk, read-only or unwritable path, ...) anywhere in
    ``exc``'s chain, or None when it is not one. Why: a full disk mid-write is a fault of the
    machine, not a bug, and deserves the same one clear line as a bad option."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "errno", None) if isinstance(e, OSError) else None
        if code is None:
            text = str(e).lower()
            code = next((c for t, c in _TEXT_FAULTS if t in text), None)
        if code in _OS_FAULTS:
            what, fix = _OS_FAULTS[code]
            where = getattr(e, "filename", None) or out
            return f"{what}{f' ({where})' if where else ''}: {fix}"
        if isinstance(e, OSError) and e.strerror:
            where = e.filename or out
            return f"{e.strerror}{f' ({where})' if where else ''}: check the path and the disk"
        e = e.__cause__ or e.__context__
    return None


def main(argv: Optional[list[str]] = None) -> int:
    """Run one subcommand. Exit codes: 0 done, 2 bad input or a fault of the machine (one line on
    stderr naming the fix), 1 an unexpected error (one line; ``-v`` shows the traceback), 130
    interrupted. Whatever fails, outputs are written atomically, so nothing half-written is left."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not args.verbose:
        from .quiet import install

        install()  # known harmless library notices (sparse_runtime/quiet.py); -v shows them
    # as the Makefile and the tests run: otherwise tokenizers warns at every fork (engine workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args._run(args) or 0)
    except SparseRuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if args.verbose:
            raise
        msg = os_fault_message(e, getattr(args, "out", None))
        if msg is not None:
            print(f"error: {msg}", file=sys.stderr)
            return 2
        text = " ".join(str(e).split())[:300]
        print(f"error: unexpected {type(e).__name__}: {text} (a bug: rerun with -v for the traceback and "
              "report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
