"""A GGUF model in llama.cpp, one sequence at a time, through ``llama-cpp-python``'s C bindings.

The low-level calls (``llama_decode`` on a batch, ``llama_get_logits_ith``, ``llama_memory_seq_rm``)
rather than the ``Llama`` class: that class keeps its own token history and score array (every
position's logits when a caller needs them for a prefill), while the engine interface needs exactly
"prefill these ids, keep the cache" and "one more token", and a benchmark must time llama.cpp, not
a wrapper.
Measured on SmolLM2-135M Q4_0 (Zen 4, 2 threads): the Python side of a decode token is 0.13-0.18 ms of
4.0-4.8 -- filling the batch 8 us, ``llama_get_logits_ith`` 14-30 us, and copying the 49,152 logits out
of llama.cpp's buffer 60-100 us (written by the other core), the same copy our lean engines make of
theirs.

Used by the ``llamacpp`` engine (:mod:`.llamacpp`) and by the ``gguf`` export's verification.
"""
from __future__ import annotations

import collections
import ctypes
import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np

INSTALL_HINT = ("sparse-runtime engines install llamacpp (pip-installs llama-cpp-python, which compiles llama.cpp "
                "for this CPU: about 4 minutes on 2 cores)")
_LOG_CALLBACK = None  # the ctypes callback that takes llama.cpp's log (kept alive here)
_LOG_TAIL: "collections.deque[str]" = collections.deque(maxlen=4)  # its last lines: the reason of a failed load


def llama_cpp_available() -> tuple[bool, str]:
    if importlib.util.find_spec("llama_cpp") is None:
        return False, f"llama-cpp-python is not installed: {INSTALL_HINT}"
    try:
        import llama_cpp  # noqa: F401  (a broken build fails here, e.g. a missing shared library)
    except Exception as e:  # pragma: no cover - depends on the build
        return False, f"llama-cpp-python does not import ({type(e).__name__}: {e}): reinstall it"
    return True, ""


def _keep(level, text, user) -> None:
    line = (text or b"").decode("utf-8", "replace").strip()
    if line:
        _LOG_TAIL.append(line)


def _quiet(L) -> None:
    """Keep llama.cpp's log off the terminal (load reports, per-context notes: the tool prints its
    own); its last lines go into the error when a load fails."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = L.llama_log_callback(_keep)
        L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def _why() -> str:
    lines = [ln for ln in _LOG_TAIL if "error" in ln.lower()] or list(_LOG_TAIL)
    return f" (llama.cpp: {' | '.join(lines)})" if lines else ""


class LlamaCppModel:
    """One GGUF model and one sequence (id 0) in llama.cpp.

    ``prefill(ids) -> logits [T, V]`` (every position) starts the sequence; ``prefill_last`` the same
    with the last position's logits only (what time-to-first-token needs: llama.cpp then skips the
    lm_head on the others); ``decode(token) -> logits [V]`` appends one; ``truncate(n)`` drops every
    cached position from ``n`` on (the benchmark's reset between rounds). ``kv_f32``: keep K/V in
    fp32 (the verification's reference setting; llama.cpp's default is fp16)."""

    def __init__(self, path: Path | str, threads: int = 1, n_ctx: int = 2048, n_batch: int = 512,
                 kv_f32: bool = False, flash_attn: Optional[bool] = None):
        import llama_cpp as L

        self.L = L
        _quiet(L)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        _LOG_TAIL.clear()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}{_why()}")
        cp = L.llama_context_default_params()
        cp.n_ctx = int(n_ctx)
        cp.n_batch = cp.n_ubatch = int(min(n_batch, n_ctx))
        cp.n_threads = cp.n_threads_batch = int(threads)
        cp.no_perf = True
        if kv_f32:
            cp.type_k = cp.type_v = L.GGML_TYPE_F32
        if flash_attn is not None:
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {path} (n_ctx {n_ctx}){_why()}")
        self.n_ctx, self.n_batch, self.threads = int(n_ctx), int(cp.n_batch), int(threads)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.n_past = 0

    # -- the sequence ---------------------------------------------------------------------------
    def _run(self, ids: np.ndarray, want_all: bool) -> np.ndarray:
        """Feed ``ids`` after the cached positions, in chunks of ``n_batch``; logits of every
        position (``want_all``) or of the last one."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.n_past + len(ids) > self.n_ctx:
            raise RuntimeError(f"llama.cpp context full: {self.n_past} + {len(ids)} tokens > n_ctx {self.n_ctx}")
        out = []
        b = self.batch
        for s in range(0, len(ids), self.n_batch):
            chunk = ids[s:s + self.n_batch]
            last_chunk = s + self.n_batch >= len(ids)
            for j, tok in enumerate(chunk):
                b.token[j] = int(tok)
                b.pos[j] = self.n_past + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = want_all or (last_chunk and j == len(chunk) - 1)
            b.n_tokens = len(chunk)
            rc = self.L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            self.n_past += len(chunk)
            rows = range(len(chunk)) if want_all else ([len(chunk) - 1] if last_chunk else [])
            for j in rows:
                p = self.L.llama_get_logits_ith(self.ctx, j)
                out.append(np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy())
        return np.stack(out)

    def prefill(self, ids) -> np.ndarray:
        self.truncate(0)
        return self._run(ids, want_all=True)

    def prefill_last(self, ids) -> np.ndarray:
        self.truncate(0)
        return self._run(ids, want_all=False)[-1]

    def decode(self, token: int) -> np.ndarray:
        return self._run(np.array([token]), want_all=False)[-1]

    def truncate(self, n: int) -> None:
        """Forget every cached position from ``n`` on."""
        if n < self.n_past:
            self.L.llama_memory_seq_rm(self.memory, 0, int(n), -1)
        self.n_past = min(self.n_past, int(n))

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        raw = text.encode("utf-8")
        buf = (self.L.llama_token * (len(raw) + 16))()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), add_special, False)
        if n < 0:  # pragma: no cover - the buffer is sized for one token a byte
            raise RuntimeError("llama.cpp's tokenizer needs a larger buffer")
        return [int(buf[i]) for i in range(n)]

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - the engines close explicitly
        try:
            self.close()
        except Exception:
            pass
