"""``ENGINES``: the engine registry, filled by importing the engine modules on first use.

The modules import their backends (onnxruntime, the DeepSparse worker, CUDA) only when an engine
is created, so listing engines is cheap and a missing backend is reported by the engine itself
with the command that installs it.
"""
from __future__ import annotations

import importlib

from ..registry import Registry

ENGINES: Registry = Registry("engine")
_MODULES = ("torch_cpu", "ort_cpu", "deepsparse_engine", "torch_cuda", "lean_cpu", "ort_quant", "llamacpp")


def discover() -> None:
    for m in _MODULES:
        importlib.import_module(f"{__package__}.{m}")


def get_engine(name: str):
    """The engine class registered under ``name`` (ConfigError listing the choices otherwise)."""
    discover()
    return ENGINES.get(name)


def engine_names() -> list[str]:
    discover()
    return ENGINES.names()


def load_engine(name: str, model, threads=None, **options):
    """Create engine ``name`` on ``model`` (raises EngineUnavailableError with the install command)."""
    return get_engine(name)(model, threads=threads, **options)


def availability() -> dict[str, tuple[bool, str]]:
    """{engine: (available, reason)} without loading any model."""
    discover()
    return {n: ENGINES.get(n).available() for n in ENGINES.names()}
