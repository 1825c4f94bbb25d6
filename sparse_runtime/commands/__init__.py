"""CLI subcommands, one module each, discovered by ``sparse_runtime.cli``.

A module defines ``COMMAND = Command(name, help, add_arguments, run)``; ``run(args)`` returns an
exit code. Commands stay thin: they parse, call the public API, and print. A module without
``COMMAND`` holds one method's option group of a command (``seft.py`` and ``losa.py``: the
``--method seft`` / ``--method losa`` options of ``finetune``, the one route per method).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable
    run: Callable
