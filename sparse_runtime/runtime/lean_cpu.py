"""``sparse-cpu`` and ``lean-cpu``: the lean Llama-family forward (:mod:`.lean_llama`) as engines.

``sparse-cpu`` runs pruned linears on the project's kernels with fused q/k/v and gate/up and a
whole decode token in one C call; ``lean-cpu`` is the same path with dense weights (a dense
matrix-vector kernel in the C step, F.linear in prefill), so dense and sparse are compared on
identical glue. Both take what ``torch-cpu`` takes (a checkpoint dir or model spec) and refuse
models the lean path does not implement with the reason (use ``torch-sparse`` there).

``dtype``: ``float32`` (default, exact, the C decode step) or ``bfloat16`` (the model loaded in bf16,
weights / packed values kept in bf16, fp32 activations; decode on the torch path, since the C step
reads fp32 only: ``lean-cpu`` bf16 is the dense bf16 baseline beside ``sparse-cpu`` bf16), or
quantized values ``int8`` / ``int4`` / a scheme name (``int4-g64-asym``; the model loaded in fp32,
every linear and the lm_head held as int8/int4 codes + fp32 scales, decode in C: ``lean-cpu`` int8
is the dense int8 baseline). A quantized checkpoint (``sparse_runtime.quant.io.read_quantization``)
is run with its own scheme and scales (its codes recovered exactly); otherwise the weights are
quantized at load by round-to-nearest. The HF
model is consumed while the engine is built (its linears freed block by block), so the engine holds
one form of each weight and a sparse model takes less memory than its dense original. A Hugging
Face directory too large to load whole (``stream``: auto/on/off, ``models.streaming.stream_path``) is
read one block at a time from its shards: the peak is the engine plus one block.
"""
from __future__ import annotations

from typing import Any

import ctypes
import gc

import numpy as np
import torch

from .base import Engine, EngineUnavailableError
from .registry import ENGINES


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere). Why: the
    source model's weights are freed while the engine is built, but blocks below glibc's (adaptive)
    mmap threshold return to the heap, where they stay resident until trimmed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _quantization(path) -> Any:
    """The quantized checkpoint's record at ``path`` (scheme and scales), or None: an ordinary
    checkpoint, a model spec, or no reader installed (then round-to-nearest at load)."""
    from pathlib import Path

    if path is None or not Path(str(path)).is_dir():
        return None
    try:
        from ..quant.io import read_quantization
    except ImportError:
        return None
    return read_quantization(str(path))


@ENGINES.register("sparse-cpu")
class SparseCPUEngine(Engine):
    name = "sparse-cpu"
    description = ("lean Llama-family forward, fused sparse linears, batch-1 decode in one C call (float32; "
                   "bfloat16 values optional)")
    install_hint = "pip install -e . (builds sparse_runtime's C kernels; see docs/kernels.md)"
    exploits_sparsity = "unstructured and N:M (project kernels)"
    sparse = True
    dtypes = ("float32", "bfloat16", "int8", "int4")
    prefill_dtypes = ("float32", "bfloat16")  # LeanConfig.prefill_dtype (the --prefill-dtype option)
    batch_dtypes = ("float32", "bfloat16")  # LeanConfig.batch_dtype (serve's --batch-dtype)
    # LeanConfig.act_dtype (--act-dtype; the int8 forms need --dtype int8): kernels.decode.ACT_DTYPES
    act_dtypes = ("float32", "int8", "int8-g64", "int8-g128")
    kv_dtypes = ("float32", "float16")  # LeanConfig.kv_dtype (--kv-dtype): the K/V cache's values

    @classmethod
    def check_available(cls) -> None:
        try:
            from ..kernels import decode
        except Exception as e:  # pragma: no cover - depends on the build
            raise EngineUnavailableError(f"{cls.name} needs sparse_runtime.kernels ({e}); run `{cls.install_hint}`")
        if not decode.available():
            from ..kernels import native

            if not native.available():  # not built, or built from other sources (the reason names the fix)
                raise EngineUnavailableError(f"{cls.name} needs the compiled kernels: {native.unavailable_reason()}")
            raise EngineUnavailableError(f"the compiled kernels lack the lean decode step (an old build); "
                                         f"run `{cls.install_hint}`")

    def _load(self, model: str, dtype: str = "float32", stream: str = "auto", **opts: Any) -> None:
        """``stream``: ``auto`` (a Hugging Face directory whose dense model would not fit comfortably
        in memory is read one block at a time, see ``models.streaming.stream_path``), ``on``, ``off``."""
        from .lean_llama import LeanConfig, LeanLlama
        from .torch_cpu import load_torch_model

        if dtype.split("-")[0] not in self.dtypes:
            from ..errors import ConfigError

            raise ConfigError(f"{self.name} runs {' or '.join(self.dtypes)}, not {dtype!r}; choose --dtype float32 "
                              f"(exact), bfloat16, int8 or int4[-g64][-asym]")
        self.dtype = dtype
        quant = {}
        if dtype.startswith("int"):  # quantized values: the model is read in fp32, quantized at load
            from ..quant.scheme import QuantScheme

            sch = QuantScheme.parse(dtype)
            quant = dict(value_dtype=f"int{sch.bits}", group=sch.group, symmetric=sch.symmetric)
            dtype = "float32"
        torch.set_num_threads(self.threads)
        from pathlib import Path

        from ..models.streaming import StreamedModel, stream_path

        path = None if (Path(model) / "export_manifest.json").is_file() else stream_path(model, dtype, stream)
        lean = LeanConfig(sparse=self.sparse, **{"value_dtype": dtype, **quant, **opts})
        self.streamed = path is not None
        if self.streamed:  # the dense model is never whole in memory: peak = engine + one block
            from .base import load_tokenizer

            self.tokenizer, self.path = load_tokenizer(path), path
            self.lean = LeanLlama(None, lean, threads=self.threads, streamed=StreamedModel(path, dtype),
                                  quantization=_quantization(path) if quant else None)
        else:
            hf, self.tokenizer, self.path = load_torch_model(model, dtype)
            hf.eval()
            self.lean = LeanLlama(hf, lean, threads=self.threads, release_source=True,
                                  quantization=_quantization(self.path) if quant else None)
            del hf  # the lean model keeps only what it reads (fused weights, norms, embedding/lm_head)
        gc.collect()  # the HF model's reference cycles: free what is left of it now, not later
        trim_heap()
        from ..kernels import counters

        self._counter0 = counters()

    @property
    def vocab_size(self) -> int:
        return self.lean.vocab

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        return self.lean.prefill(torch.as_tensor(ids, dtype=torch.long)).numpy()

    def prefill_next(self, ids: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        return self.lean.prefill(torch.as_tensor(ids, dtype=torch.long), last_only=True).numpy()

    def decode(self, ids: np.ndarray) -> np.ndarray:
        if self.lean.length == 0:
            raise RuntimeError("decode before prefill")
        torch.set_num_threads(self.threads)
        return self.lean.decode(torch.as_tensor(ids, dtype=torch.long)).numpy()

    # -- slots (continuous batching in sparse_runtime.serve; see LeanLlama.init_slots) ---------------
    supports_slots = True

    def init_slots(self, n_slots: int, capacity: int) -> None:
        if self.dtype == "bfloat16":
            from ..errors import ConfigError

            raise ConfigError(f"{self.name} serves float32 or int8/int4 values only (the batched slots and the C step "
                              f"do not read bf16); load it with dtype float32")
        self.lean.init_slots(n_slots, capacity)

    def prefill_slot(self, slot: int, ids) -> torch.Tensor:
        torch.set_num_threads(self.threads)
        return self.lean.prefill_slot(slot, torch.as_tensor(ids, dtype=torch.long))

    def decode_slots(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        torch.set_num_threads(self.threads)
        return self.lean.decode_slots(slots, tokens)

    def free_slot(self, slot: int) -> None:
        self.lean.free_slot(slot)

    def slot_bytes(self) -> int:
        return self.lean.slot_bytes()

    def _snapshot(self) -> int:
        return self.lean.length

    def _restore(self, snap: int) -> None:
        self.lean.length = snap  # later cache slots are overwritten by the next steps

    def info(self) -> dict[str, Any]:
        return {**super().info(), "dtype": self.dtype, "streamed": self.streamed, "torch": torch.__version__,
                "kernel_isa": self.lean.isa, "lean": self.lean.summary()}

    def memory(self) -> dict[str, Any]:
        """Load RSS plus the bytes of every tensor the engine holds (weights, caches, scratch)."""
        return {**super().memory(), "held_tensor_mb": round(self.lean.held_bytes() / 2 ** 20, 1)}

    def evidence(self) -> dict[str, Any]:
        """``module_calls``: this model's own sparse/dense product counts; ``kernel_calls``: the C
        library's per-path counters since load (process-wide: other models' calls included);
        ``prefill_forms``: the fused prefill forms its products ran (amx, bf16walk, avx2, avx2q)."""
        from ..kernels import counters

        now = counters()
        delta = {p: v - self._counter0.get(p, 0) for p, v in now.items() if v - self._counter0.get(p, 0)}
        forms: dict[str, int] = {}
        for f in self.lean.linears():
            for k, v in f.prefill_forms.items():
                forms[k] = forms.get(k, 0) + v
        return {"sparse_path": self.lean.summary(), "kernel_calls": delta, "module_calls": self.lean.call_counts(),
                "prefill_forms": forms}


@ENGINES.register("lean-cpu")
class LeanCPUEngine(SparseCPUEngine):
    name = "lean-cpu"
    description = "the sparse-cpu path with dense weights (dense C matrix-vector kernel; the fair dense baseline)"
    exploits_sparsity = "no"
    sparse = False
