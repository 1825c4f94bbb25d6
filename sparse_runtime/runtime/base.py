"""The engine interface: one way to run a (sparse) causal LM, whatever executes it.

An engine holds ONE model and ONE sequence state (the KV cache of the last ``prefill``):

- ``prefill(ids [B, T]) -> logits [B, T, V]`` starts a new sequence and keeps its cache;
- ``decode(ids [B, 1]) -> logits [B, 1, V]`` appends one token per row to that cache;
- ``generate(prompt_ids, max_new_tokens)`` streams greedy token ids (built on the two above);
- ``timer(scenario)`` prepares a timed unit of work (a prefill of a fixed shape, or ``steps``
  decode steps from a fixed context) and returns a function that runs it once and returns the
  seconds it took. The benchmark alternates such functions across dense and sparse models; an
  engine that runs out of process (DeepSparse) measures inside its worker so the pipe is not timed;
- ``evidence()``: what proves which path ran (DeepSparse's share of optimised ops, the CUDA kernel
  the profiler saw, our kernels' call counter, or "dense kernels only").

Why a single-sequence, stateful interface: it is all ``generate`` and the latency protocol need
(batch-1 decode, fixed-shape prefill), and every backend can implement it without a scheduler.

Engines are imported lazily (the registry maps a name to a module); a missing backend raises
:class:`EngineUnavailableError` whose message is the exact install command.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..errors import SparseRuntimeError


class EngineUnavailableError(SparseRuntimeError):
    """The engine's backend is not installed or cannot run here (no GPU, wrong ISA)."""


@dataclass(frozen=True)
class Scenario:
    """One timed unit of work. ``kind``: ``prefill`` (one forward over ``batch x tokens``) or
    ``decode`` (``steps`` single-token steps with KV cache after a context of ``tokens``)."""

    kind: str
    tokens: int
    batch: int = 1
    steps: int = 16

    @property
    def label(self) -> str:
        if self.kind == "prefill":
            return f"prefill b{self.batch} x {self.tokens}"
        return f"decode b{self.batch} @ ctx {self.tokens}"

    @property
    def unit(self) -> str:
        return "ms" if self.kind == "prefill" else "ms/token"

    def per_unit(self, seconds: float) -> float:
        """Seconds of one timed run -> the reported figure (ms, or ms per decoded token)."""
        return seconds * 1e3 / (self.steps if self.kind == "decode" else 1)


def benchmark_ids(vocab_size: int, batch: int, tokens: int, seed: int = 0) -> np.ndarray:
    """Deterministic token ids for timing (content does not change dense-kernel time; the same ids
    go to dense and sparse models)."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, max(4, vocab_size), size=(batch, tokens), dtype=np.int64)


def default_threads() -> int:
    """The benchmark's fixed thread count: ``SPARSE_RUNTIME_THREADS`` or min(2, cores)."""
    env = os.environ.get("SPARSE_RUNTIME_THREADS")
    return int(env) if env else max(1, min(2, os.cpu_count() or 1))


def rss_mb() -> float:
    """Current resident set size of this process (MB), from /proc (Linux) or ru_maxrss."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Engine:
    """Base class; see the module docstring. Subclasses set ``name``, ``description``,
    ``install_hint`` and implement ``_load``, ``prefill``, ``decode``, ``_snapshot``/``_restore``."""

    name: str = ""
    description: str = ""
    install_hint: str = ""
    exploits_sparsity: str = "no"  # what the engine does with zeros: "no", "unstructured", "2:4", ...
    dtypes: tuple[str, ...] = ("float32",)  # compute dtypes its ``dtype`` option accepts (first: the default)

    def __init__(self, model: str | os.PathLike, threads: Optional[int] = None, **options: Any):
        self.check_available()
        self.source = str(model)
        self.threads = int(threads or default_threads())
        self.options = dict(options)
        rss0 = rss_mb()
        t0 = time.perf_counter()
        self._load(self.source, **options)
        self.load_seconds = time.perf_counter() - t0
        self.load_rss_mb = rss_mb() - rss0

    # -- availability -------------------------------------------------------------------------
    @classmethod
    def check_available(cls) -> None:
        """Raise :class:`EngineUnavailableError` (with the install command) when it cannot run."""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            cls.check_available()
        except EngineUnavailableError as e:
            return False, str(e)
        return True, ""

    # -- the model ----------------------------------------------------------------------------
    def _load(self, model: str, **options: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    tokenizer: Any = None
    max_length: Optional[int] = None  # most tokens a sequence may hold (static caches); None: no limit

    def prefill(self, ids: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, ids: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def _snapshot(self) -> Any:  # pragma: no cover - interface
        """The current sequence state (cheap to take; restored by :meth:`_restore`)."""
        raise NotImplementedError

    def _restore(self, snap: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    # -- slots (optional): many sequences at once, for serving ------------------------------------
    # Engines with ``supports_slots`` also implement ``init_slots(n_slots, capacity)``,
    # ``prefill_slot(slot, ids [T]) -> logits [V]`` (torch), ``decode_slots(slots, tokens) -> logits
    # [B, V]`` (one batched step, per-slot cache lengths), ``free_slot(slot)`` and ``slot_bytes()``;
    # ``sparse_runtime.serve`` batches them continuously. Others are served one sequence at a time
    # by swapping their single-sequence state (docs/serving.md).
    supports_slots: bool = False

    # -- generation ---------------------------------------------------------------------------
    def prefill_next(self, ids: np.ndarray) -> np.ndarray:
        """Start a sequence with ``ids`` [B, T] and return the logits generation needs: the last
        position's, ``[B, 1, V]``. The prefill scenario times this (time to the first token).
        Engines whose graph computes every position's logits (the ONNX exports) compute them all
        and keep the last; engines that can skip the others (the lean path) override this."""
        return self.prefill(ids)[:, -1:]

    def generate(self, prompt_ids, max_new_tokens: int = 32, eos_token_id: Optional[int] = None) -> Iterator[int]:
        """Greedy decoding, one token id at a time (batch 1), so callers can stream text."""
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] == 0:  # every engine's prefill fails on it, each with its own traceback
            raise SparseRuntimeError("the prompt is empty (0 tokens): give --prompt some text")
        logits = self.prefill_next(ids)
        n = ids.shape[1]
        for _ in range(max_new_tokens):
            tok = int(np.argmax(logits[0, -1]))
            yield tok
            if eos_token_id is not None and tok == eos_token_id:
                return
            if self.max_length is not None and n >= self.max_length:
                return  # the engine's static cache is full
            n += 1
            logits = self.decode(np.array([[tok]], dtype=np.int64))

    # -- timing -------------------------------------------------------------------------------
    def timer(self, scenario: Scenario, seed: int = 0) -> Callable[[], float]:
        """Prepare ``scenario`` and return a function running it once -> seconds."""
        ids = benchmark_ids(self.vocab_size, scenario.batch, scenario.tokens, seed)
        if scenario.kind == "prefill":
            def run_prefill() -> float:
                t = time.perf_counter()
                self.prefill_next(ids)
                return time.perf_counter() - t
            return run_prefill
        if scenario.kind != "decode":
            raise SparseRuntimeError(f"unknown scenario kind {scenario.kind!r}")
        self.prefill(ids)
        snap = self._snapshot()
        steps = benchmark_ids(self.vocab_size, scenario.batch, scenario.steps, seed + 1)

        def run_decode() -> float:
            self._restore(snap)
            t = time.perf_counter()
            for i in range(scenario.steps):
                self.decode(steps[:, i:i + 1])
            return time.perf_counter() - t
        return run_decode

    def release(self, scenario: Scenario) -> None:
        """Free what :meth:`timer` compiled or cached for ``scenario`` (engines with per-shape
        compiled graphs override this)."""

    # -- reporting ----------------------------------------------------------------------------
    def evidence(self) -> dict[str, Any]:
        return {"sparse_path": "none: dense kernels only"}

    def info(self) -> dict[str, Any]:
        return {"engine": self.name, "threads": self.threads, "dtype": "float32"}

    def memory(self) -> dict[str, Any]:
        return {"load_rss_mb": round(self.load_rss_mb, 1)}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_tokenizer(path: Optional[Path]):
    """The tokenizer saved beside a model or export (None when there is none: tiny byte models
    get the ByteTokenizer from the caller)."""
    if path is None:
        return None
    p = Path(path)
    if not any((p / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from ..models import ByteTokenizer

        return ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(p)
