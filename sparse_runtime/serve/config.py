"""The server's settings (one dataclass, filled from the command line or by tests)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ServeConfig:
    """``slots``: sequences decoded together (the batch of one step); ``max_model_len``: tokens one
    sequence may hold (prompt + output; each slot's KV cache is preallocated at this size);
    ``prefill_chunk``: prompt tokens run per scheduler step, so a long prompt delays the running
    sequences' next token by at most one chunk; ``max_queue``: requests waiting for a slot before
    new ones get 429; ``request_timeout``: seconds a request may take in all (then it ends with
    finish_reason ``timeout``); ``shutdown_grace``: seconds in-flight requests get after SIGTERM."""

    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = 16
    max_model_len: int = 1024
    prefill_chunk: int = 128
    max_queue: int = 64
    request_timeout: float = 600.0
    shutdown_grace: float = 30.0
    retry_after: int = 1
    served_model_name: Optional[str] = None
    default_max_tokens: int = 16  # /v1/completions default (OpenAI's); chat defaults to the room left
