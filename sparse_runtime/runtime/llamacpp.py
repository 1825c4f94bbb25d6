"""``llamacpp``: llama.cpp's CPU backend on the ``gguf`` export, the runtime most CPU users run 8- and
4-bit models on.

The dense quantized baseline beside ORT's (``ort-int8`` / ``ort-int4``): a checkpoint is exported
once to GGUF in ``qtype`` (``Q8_0`` by default; ``Q4_0``, ``F16``, ``BF16``, ``F32``; every 2-D weight incl. the
embedding and lm_head in that type, llama.cpp's ``--pure``; :mod:`exporters.gguf`) and cached, then
run through ``llama-cpp-python``'s C bindings (:mod:`.llamacpp_model`). llama.cpp has no sparse
formats: a pruned checkpoint runs at the dense speed of its type, zeros multiplied. Its K/V cache is
fp16 (llama.cpp's default; ``kv_dtype="float32"`` for fp32) and its attention is its default
(``flash_attn`` None: llama.cpp decides).

Options: ``qtype`` (and the other ``gguf`` export options, which key the cached export), ``n_ctx``
(the cache's capacity, default 2048), ``kv_dtype``, ``flash_attn``. Batch 1 only: llama.cpp runs
several sequences through its own scheduler, which the single-sequence interface does not model.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .base import Engine, EngineUnavailableError, load_tokenizer
from .llamacpp_model import INSTALL_HINT
from .registry import ENGINES

KV_DTYPES = ("float16", "float32")


@ENGINES.register("llamacpp")
class LlamaCppEngine(Engine):
    name = "llamacpp"
    description = "llama.cpp CPU backend (llama-cpp-python) on a dense GGUF export (Q8_0 / Q4_0 / F16 / F32)"
    install_hint = INSTALL_HINT
    exploits_sparsity = "no"
    dtypes = ("Q8_0", "Q4_0", "F16", "BF16", "F32")

    @classmethod
    def check_available(cls) -> None:
        from .llamacpp_model import llama_cpp_available

        ok, why = llama_cpp_available()
        if not ok:
            raise EngineUnavailableError(f"the llamacpp engine needs {why}")

    def _load(self, model: str, qtype: str = "Q8_0", n_ctx: int = 2048, kv_dtype: str = "float16",
              flash_attn: Optional[bool] = None, dtype: Optional[str] = None, **export_options: Any) -> None:
        from exporters.gguf import GGUF_NAME
        from sparse_runtime.errors import ConfigError

        from .exports import ensure_export
        from .llamacpp_model import LlamaCppModel

        if kv_dtype not in KV_DTYPES:
            raise ConfigError(f"llamacpp kv_dtype {kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}")
        self.qtype = str(dtype or qtype).upper()  # ``dtype`` is the engines' common spelling of the value type
        self.export_dir = ensure_export(model, "gguf", qtype=self.qtype, **export_options)
        self.kv_dtype = kv_dtype
        self.m = LlamaCppModel(self.export_dir / GGUF_NAME, threads=self.threads, n_ctx=n_ctx,
                               kv_f32=kv_dtype == "float32", flash_attn=flash_attn)
        self.max_length = int(n_ctx)
        self.tokenizer = load_tokenizer(self.export_dir)

    @property
    def vocab_size(self) -> int:
        return self.m.n_vocab

    def _one(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1:
            from sparse_runtime.errors import ConfigError

            raise ConfigError(f"the llamacpp engine runs batch 1 (got ids of shape {tuple(ids.shape)}): "
                              "time batches on lean-cpu / sparse-cpu, or serve through llama-server")
        return ids[0]

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self.m.prefill(self._one(ids))[None]

    def prefill_next(self, ids: np.ndarray) -> np.ndarray:
        return self.m.prefill_last(self._one(ids))[None, None]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return self.m.decode(int(self._one(ids)[0]))[None, None]

    def _snapshot(self) -> int:
        """The cache's length: restoring cuts the cache back to it, which is what the timer needs (the
        same sequence, rerun from its context). It cannot bring back positions another sequence
        overwrote, and the engine has none of the state attributes the server swaps, so
        ``serve`` runs llamacpp sequences one at a time (sparse_runtime/serve/slots.py)."""
        return self.m.n_past

    def _restore(self, snap: int) -> None:
        self.m.truncate(snap)

    def info(self) -> dict[str, Any]:
        import llama_cpp

        return {**super().info(), "dtype": self.qtype, "llama_cpp_python": llama_cpp.__version__,
                "kv_dtype": self.kv_dtype, "export": str(self.export_dir)}

    def scheme(self) -> dict[str, Any]:
        """The export manifest's quantization record (scheme, bytes per weight, ...)."""
        from .exports import export_quantization

        return export_quantization(self.export_dir)

    def evidence(self) -> dict[str, Any]:
        return {"sparse_path": f"none: llama.cpp multiplies dense {self.qtype} blocks (zeros stored)",
                "scheme": self.qtype}

    def close(self) -> None:
        m = getattr(self, "m", None)
        if m is not None:
            m.close()
