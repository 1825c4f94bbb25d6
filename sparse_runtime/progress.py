"""Progress bars (tqdm) that stay quiet where nobody watches (``SPARSE_RUNTIME_QUIET=1``, CI logs)."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

_PHASES: list[str] = []


@contextlib.contextmanager
def phase(label: str) -> Iterator[None]:
    """Name a long phase: every bar opened inside it reads ``label: <its own desc>``, so a pass
    repeated inside a search (ATP's beta candidates) says which repetition it is."""
    _PHASES.append(label)
    try:
        yield
    finally:
        _PHASES.pop()


def progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    if _PHASES:
        kw["desc"] = ": ".join([*_PHASES, *([kw["desc"]] if kw.get("desc") else [])])
    asked = bool(kw.pop("disable", False))
    disable = asked or bool(os.environ.get("SPARSE_RUNTIME_QUIET"))
    if not disable and not sys.stderr.isatty() and os.environ.get("CI"):
        kw.setdefault("mininterval", 30.0)
    return tqdm(iterable, disable=disable, dynamic_ncols=True, leave=False, **kw)
