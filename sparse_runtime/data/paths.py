"""Where data comes from: a directory the user names, ``$SPARSE_RUNTIME_DATA``, or the HF hub.

The directory layout is that of the project's shared data folder (``wikitext-2/wiki.test.raw``,
``c4/c4_sample.jsonl``, ``alpaca/alpaca_5000.json``, the zero-shot sets...). Missing data is a
clear error that lists every place that was tried and how to fix it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from ..errors import DataNotFoundError

ENV_VAR = "SPARSE_RUNTIME_DATA"


def data_dirs(data_dir: Optional[os.PathLike] = None) -> list[Path]:
    dirs = []
    if data_dir:
        dirs.append(Path(data_dir).expanduser())
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    return dirs


def find_file(relpath: str, data_dir: Optional[os.PathLike] = None,
              hub: Optional[Callable[[], Path]] = None, what: str = "") -> Path:
    """Return the first existing ``dir/relpath``; else try ``hub()``; else a clear error."""
    tried = []
    for d in data_dirs(data_dir):
        p = d / relpath
        if p.is_file():
            return p
        tried.append(str(p))
    hub_error = None
    if hub is not None and not os.environ.get("HF_HUB_OFFLINE") and not os.environ.get("HF_DATASETS_OFFLINE"):
        try:
            return hub()
        except ModuleNotFoundError as e:  # the hub fallback needs the optional `datasets` package
            hub_error = f"needs `pip install {e.name or 'datasets'}`"
        except Exception as e:  # no network, ...
            hub_error = f"{type(e).__name__}: {e}"
    # one line, the fix first: a newcomer usually has the data and has not said where it is
    msg = (f"cannot find {what or relpath}. Fix: export {ENV_VAR}=/path/to/data (a directory holding {relpath}) "
           f"or pass --data-dir (docs/data.md). Looked in: "
           + (", ".join(tried) if tried else f"no data directory (${ENV_VAR} is unset)"))
    if hub is not None:
        msg += f"; the Hugging Face hub: {hub_error or 'offline mode is set'}"
    raise DataNotFoundError(msg + ".")


def hub_cache(name: str) -> Path:
    from ..models.loading import cache_dir

    p = cache_dir() / "data" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p
