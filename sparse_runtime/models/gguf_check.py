"""Validate a GGUF file before transformers reads it.

Why: transformers hands a damaged GGUF to the ``gguf`` reader, whose errors ("GGUF magic invalid",
a numpy buffer error on a truncated file) escape as tracebacks that do not say which file is bad.
Reading the header and the tensor table here (memory-mapped, no tensor data is copied) turns every
such fault into one line that names the file and the fix.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelLoadError

MAGIC = b"GGUF"


def check_gguf(path: os.PathLike) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` is a readable, complete GGUF file."""
    p = Path(path)
    fix = "download or convert it again, or give a Hugging Face model directory"
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {p}: {e.strerror}; check the path and its permissions") from e
    if head != MAGIC:
        raise ModelLoadError(f"{p} is not a GGUF file (it does not start with 'GGUF'): {fix}")
    try:
        from gguf import GGUFReader
    except ImportError:
        return  # the loader names the missing package
    try:
        reader = GGUFReader(str(p))
        n_tensors = len(reader.tensors)
    except Exception as e:  # noqa: BLE001 - the reader's errors are ValueError, IndexError, struct/numpy errors
        raise ModelLoadError(f"{p} is a damaged or truncated GGUF file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:120]}): {fix}") from e
    if n_tensors == 0:
        raise ModelLoadError(f"{p} holds no tensors: {fix}")
