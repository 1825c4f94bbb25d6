"""Engines that run a (sparse) model, and the latency benchmark that compares them.

``load_engine(name, model_dir, threads=None, **options)`` -> :class:`Engine` with ``prefill``,
``decode``, ``generate`` (greedy, streaming), ``timer`` and ``evidence``. Engines: ``torch-cpu``,
``torch-sparse`` (the project's kernels), ``ort-cpu``, ``deepsparse`` (own venv, evaluation-only
licence), ``torch-cuda-24`` (2:4 semi-structured on CUDA). See docs/runtime.md.
"""
from .base import Engine, EngineUnavailableError, Scenario
from .registry import ENGINES, availability, engine_names, get_engine, load_engine

__all__ = ["ENGINES", "Engine", "EngineUnavailableError", "Scenario", "availability", "engine_names",
           "get_engine", "load_engine"]
