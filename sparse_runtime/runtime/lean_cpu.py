"""``sparse-cpu`` and ``lean-cpu``: the lean Llama-family forward (:mod:`.lean_llama`) as engines.

``sparse-cpu`` runs pruned linears on the project's kernels with fused q/k/v and gate/up and a
whole decode token in one C call; ``lean-cpu`` is the same path with dense weights (a dense
matrix-vector kernel in the C step, F.linear in prefill), so dense and sparse are compared on
identical glue. Both take what ``torch-cpu`` takes (a checkpoint dir or model spec) and refuse
models the lean path does not implement with the reason (use ``torch-sparse`` there).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import Engine, EngineUnavailableError
from .registry import ENGINES


@ENGINES.register("sparse-cpu")
class SparseCPUEngine(Engine):
    name = "sparse-cpu"
    description = "lean Llama-family forward, fused sparse linears, batch-1 decode in one C call (float32)"
    install_hint = "pip install -e . (builds sparse_runtime's C kernels; see docs/kernels.md)"
    exploits_sparsity = "unstructured and N:M (project kernels)"
    sparse = True

    @classmethod
    def check_available(cls) -> None:
        try:
            from ..kernels import decode
        except Exception as e:  # pragma: no cover - depends on the build
            raise EngineUnavailableError(f"{cls.name} needs sparse_runtime.kernels ({e}); run `{cls.install_hint}`")
        if not decode.available():
            from ..kernels import _lib

            raise EngineUnavailableError(f"the compiled kernels lack the lean decode step "
                                         f"({_lib.unavailable_reason() or 'an old build'}); run `{cls.install_hint}`")

    def _load(self, model: str, dtype: str = "float32", **opts: Any) -> None:
        from .lean_llama import LeanConfig, LeanLlama
        from .torch_cpu import load_torch_model

        if dtype != "float32":
            from ..errors import ConfigError

            raise ConfigError(f"{self.name} runs float32 only (got dtype {dtype!r})")
        torch.set_num_threads(self.threads)
        hf, self.tokenizer, self.path = load_torch_model(model, dtype)
        hf.eval()
        self.lean = LeanLlama(hf, LeanConfig(sparse=self.sparse, **opts), threads=self.threads)
        del hf  # the lean model keeps only what it reads (fused weights, norms, embedding/lm_head)
        from ..kernels import counters

        self._counter0 = counters()

    @property
    def vocab_size(self) -> int:
        return self.lean.vocab

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        return self.lean.prefill(torch.as_tensor(ids, dtype=torch.long)).numpy()

    def decode(self, ids: np.ndarray) -> np.ndarray:
        if self.lean.length == 0:
            raise RuntimeError("decode before prefill")
        torch.set_num_threads(self.threads)
        return self.lean.decode(torch.as_tensor(ids, dtype=torch.long)).numpy()

    # -- slots (continuous batching in sparse_runtime.serve; see LeanLlama.init_slots) ---------------
    supports_slots = True

    def init_slots(self, n_slots: int, capacity: int) -> None:
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
        return {**super().info(), "torch": torch.__version__, "kernel_isa": self.lean.isa, "lean": self.lean.summary()}

    def evidence(self) -> dict[str, Any]:
        """``module_calls``: this model's own sparse/dense product counts; ``kernel_calls``: the C
        library's per-path counters since load (process-wide: other models' calls included)."""
        from ..kernels import counters

        now = counters()
        delta = {p: v - self._counter0.get(p, 0) for p, v in now.items() if v - self._counter0.get(p, 0)}
        return {"sparse_path": self.lean.summary(), "kernel_calls": delta, "module_calls": self.lean.call_counts()}


@ENGINES.register("lean-cpu")
class LeanCPUEngine(SparseCPUEngine):
    name = "lean-cpu"
    description = "the sparse-cpu path with dense weights (dense C matrix-vector kernel; the fair dense baseline)"
    exploits_sparsity = "no"
    sparse = False
