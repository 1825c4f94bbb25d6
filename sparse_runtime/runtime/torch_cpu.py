"""``torch-cpu``: PyTorch eager on the CPU (the reference engine).

Loads a checkpoint directory, any :func:`sparse_runtime.load_model` spec, or a 2:4
``semi-structured`` export (rebuilt dense on the CPU). Weights are dense tensors: a pruned model runs
exactly as fast as the dense one (PyTorch has no CPU kernel that skips zeros in a dense tensor, and
its CSR matmul was slower than dense here, docs/stack.md). ``compile=True`` wraps the forward in
``torch.compile`` (dynamic shapes); it costs tens of seconds per new shape on 2 cores and gave no
reliable gain at batch-1 decode, so it is off by default.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .base import Engine
from .registry import ENGINES


def load_torch_model(source: str, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer, path)`` from a checkpoint/spec or a semi-structured export."""
    from ..models import load_model

    p = Path(source)
    man = p / "export_manifest.json"
    if man.is_file():
        fmt = json.loads(man.read_text()).get("export_format")
        if fmt == "semi-structured":
            from exporters.semi_structured import load_semi_structured

            from .base import load_tokenizer

            model, _ = load_semi_structured(p, device=device, backend="dense" if device == "cpu" else "auto")
            return model, load_tokenizer(p), p
    lm = load_model(source, dtype)
    return lm.model.to(device), lm.tokenizer, lm.path


@ENGINES.register("torch-cpu")
class TorchCPUEngine(Engine):
    name = "torch-cpu"
    dtypes = ("float32", "bfloat16")
    description = "PyTorch eager, CPU, dense kernels (float32)"
    install_hint = "pip install torch==2.13.0 (the CPU wheel)"
    exploits_sparsity = "no"

    def _load(self, model: str, dtype: str = "float32", compile: bool = False, **_: Any) -> None:
        torch.set_num_threads(self.threads)
        self.dtype = dtype
        self.model, self.tokenizer, self.path = load_torch_model(model, dtype)
        self.model.eval()
        self._forward = self.model.forward
        if compile:
            self._forward = torch.compile(self.model.forward, dynamic=True)
        self.compiled = bool(compile)
        self._cache = None

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def _run(self, ids: np.ndarray, cache, **kw) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self._forward(input_ids=torch.as_tensor(ids, dtype=torch.long), past_key_values=cache,
                                use_cache=True, **kw)
        self._cache = out.past_key_values
        return out.logits.float().numpy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        from transformers import DynamicCache

        return self._run(ids, DynamicCache())

    def prefill_next(self, ids: np.ndarray) -> np.ndarray:
        """The last position's logits only (``logits_to_keep=1``, as transformers' ``generate`` does)."""
        from transformers import DynamicCache

        return self._run(ids, DynamicCache(), logits_to_keep=1)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        if self._cache is None:
            raise RuntimeError("decode before prefill")
        return self._run(ids, self._cache)

    def _snapshot(self) -> int:
        return int(self._cache.get_seq_length())

    def _restore(self, snap: int) -> None:
        self._cache.crop(snap)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "torch": torch.__version__, "dtype": self.dtype, "compiled": self.compiled}

    def evidence(self) -> dict[str, Any]:
        return {"sparse_path": "none: dense torch kernels (zeros are multiplied like any weight)"}


def sparse_kernels_module():
    """The project's CPU sparse kernels (issue 9), or None when they are absent/unbuilt."""
    try:
        from .. import kernels
    except Exception:  # pragma: no cover - depends on the build
        return None
    return kernels if hasattr(kernels, "sparsify_linears") else None


@ENGINES.register("torch-sparse")
class TorchSparseEngine(TorchCPUEngine):
    """PyTorch eager with the project's own sparse linear kernels swapped in for pruned linears."""

    name = "torch-sparse"
    description = "PyTorch eager, CPU, pruned linears replaced by sparse_runtime.kernels.SparseLinear"
    install_hint = "pip install -e . (builds sparse_runtime's C kernels; see docs/kernels.md)"
    exploits_sparsity = "unstructured and N:M (project kernels)"

    @classmethod
    def check_available(cls) -> None:
        from .base import EngineUnavailableError

        k = sparse_kernels_module()
        if k is None:
            raise EngineUnavailableError("torch-sparse needs the project's sparse kernels "
                                         "(sparse_runtime.kernels.sparsify_linears); reinstall with "
                                         f"`{cls.install_hint}`")
        lib = getattr(k, "native", None)
        if lib is not None and hasattr(lib, "available") and not lib.available():
            raise EngineUnavailableError(f"the sparse kernels are not built ({lib.unavailable_reason()}); "
                                         f"run `{cls.install_hint}`")

    def _load(self, model: str, dtype: str = "float32", compile: bool = False, **opts: Any) -> None:
        super()._load(model, dtype, compile=False)
        k = sparse_kernels_module()
        self.report = k.sparsify_linears(self.model, **opts)
        self._counter0 = self._counter()

    @staticmethod
    def _counter() -> dict[str, int]:
        k = sparse_kernels_module()
        try:
            return dict(k.native.counters())
        except Exception:  # pragma: no cover
            return {}

    def evidence(self) -> dict[str, Any]:
        """The C library's per-path call counters since load, and the modules' own sparse/dense
        call counts (a SparseLinear falls back to dense above its measured batch threshold)."""
        k = sparse_kernels_module()
        now = self._counter()
        delta = {p: v - self._counter0.get(p, 0) for p, v in now.items() if v - self._counter0.get(p, 0)}
        summary = self.report.summary() if hasattr(self.report, "summary") else str(self.report)
        return {"sparse_path": summary, "kernel_calls": delta, "module_calls": k.call_counts(self.model)}

    def info(self) -> dict[str, Any]:
        k = sparse_kernels_module()
        isa = None
        try:
            isa = k.select_isa()
        except Exception:  # pragma: no cover
            pass
        return {**super().info(), "kernel_isa": isa}
