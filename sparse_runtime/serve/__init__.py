"""``sparse-runtime serve``: an OpenAI-compatible HTTP server on the project's engines.

Modules, one job each: :mod:`.protocol` (request parsing, OpenAI-style errors), :mod:`.sampling`
(temperature/top-k/top-p with a per-request seed), :mod:`.text` (chat template, incremental
detokenisation and stop strings), :mod:`.slots` (the engine behind a slot interface: the lean
engines' batched cache, or a state-swapping fallback), :mod:`.scheduler` (continuous batching in
one engine thread), :mod:`.metrics` (Prometheus text), :mod:`.app` (the ASGI app) and
:mod:`.server` (uvicorn). The web stack (starlette, uvicorn) is imported only here, lazily, so the
rest of the package works without it (``pip install 'sparse-runtime[serve]'``). See docs/serving.md.
"""
from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig"]
