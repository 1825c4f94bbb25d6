"""Progress bars (tqdm) that stay quiet where nobody watches (``SPARSE_RUNTIME_QUIET=1``, CI logs)."""
from __future__ import annotations

import os
import sys


def progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    asked = bool(kw.pop("disable", False))
    disable = asked or bool(os.environ.get("SPARSE_RUNTIME_QUIET"))
    if not disable and not sys.stderr.isatty() and os.environ.get("CI"):
        kw.setdefault("mininterval", 30.0)
    return tqdm(iterable, disable=disable, dynamic_ncols=True, leave=False, **kw)
