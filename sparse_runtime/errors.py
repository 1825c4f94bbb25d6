"""Error types. Every error a user can trigger says what was wrong and how to fix it.

All derive from :class:`SparseRuntimeError` (a ``ValueError``), so callers can catch one type and the
CLI can print the message without a traceback.
"""
from __future__ import annotations


class SparseRuntimeError(ValueError):
    """Base class: a clear, user-facing error."""


class ConfigError(SparseRuntimeError):
    """An invalid option (sparsity out of range, unknown method, N:M that does not divide, ...)."""


class UnsupportedModelError(SparseRuntimeError):
    """The model's architecture has no family adapter."""


class ModelLoadError(SparseRuntimeError):
    """A model path that is missing, not a Hugging Face directory, or holds pickled weights."""


class DataNotFoundError(SparseRuntimeError):
    """A data set that is in none of the places we looked."""


class ManifestError(SparseRuntimeError):
    """A sparsity manifest that is missing, corrupt, foreign, or disagrees with the weights."""


class CheckpointExistsError(SparseRuntimeError):
    """Refusing to overwrite an existing output directory without ``overwrite=True``."""
