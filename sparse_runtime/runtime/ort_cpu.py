"""``ort-cpu``: ONNX Runtime's CPU provider on the exporters' ONNX decoder with KV cache.

Accepts an ``onnx`` export directory (``exporters``, format ``onnx``) or a checkpoint/spec, which is
exported once and cached (:mod:`sparse_runtime.runtime.exports`). ORT multiplies every weight as a
dense tensor (sparse initializers are densified on load), so a pruned model runs at the dense
model's speed here; the benchmark shows it rather than asserting it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from .base import Engine, EngineUnavailableError, load_tokenizer
from .registry import ENGINES

MODEL_FILE = "model.onnx"


@ENGINES.register("ort-cpu")
class OrtCPUEngine(Engine):
    name = "ort-cpu"
    description = "ONNX Runtime CPUExecutionProvider, optimum decoder with KV cache (float32)"
    install_hint = "pip install onnxruntime optimum-onnx (pip install 'sparse-runtime[onnx]')"
    exploits_sparsity = "no"
    export_format = "onnx"  # the exporters' format this engine runs (subclasses: the quantized ones)

    @classmethod
    def check_available(cls) -> None:
        import importlib.util

        for mod in ("onnxruntime", "onnx"):
            if importlib.util.find_spec(mod) is None:
                raise EngineUnavailableError(f"the ort-cpu engine needs {mod}: {cls.install_hint}")

    def _load(self, model: str, graph_optimization: str = "all", **export_options: Any) -> None:
        from exporters.onnx_ort import run_with_past

        from .exports import ensure_export

        self.export_dir = ensure_export(model, self.export_format, **export_options)
        self.graph_optimization = graph_optimization
        self.session = self._session()
        self._run = run_with_past
        self.tokenizer = load_tokenizer(self.export_dir)
        out0 = self.session.get_outputs()[0]
        self._vocab = int(out0.shape[-1]) if isinstance(out0.shape[-1], int) else None
        self._past: Optional[dict] = None
        self._len = 0

    def _session(self):
        """The ORT session over the export (subclasses change the graph first)."""
        from exporters.onnx_common import ort_session

        return ort_session(self.export_dir / MODEL_FILE, threads=self.threads, level=self.graph_optimization)

    @property
    def vocab_size(self) -> int:
        if self._vocab is None:
            import json

            self._vocab = int(json.loads((self.export_dir / "config.json").read_text())["vocab_size"])
        return self._vocab

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        logits, self._past = self._run(self.session, np.asarray(ids, dtype=np.int64), past=None)
        self._len = ids.shape[1]
        return logits

    def decode(self, ids: np.ndarray) -> np.ndarray:
        if self._past is None:
            raise RuntimeError("decode before prefill")
        logits, self._past = self._run(self.session, np.asarray(ids, dtype=np.int64), past=self._past,
                                       past_len=self._len)
        self._len += ids.shape[1]
        return logits

    def _snapshot(self):
        return self._past, self._len

    def _restore(self, snap) -> None:
        self._past, self._len = snap

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {**super().info(), "onnxruntime": ort.__version__, "graph_optimization": self.graph_optimization,
                "export": str(self.export_dir)}

    def evidence(self) -> dict[str, Any]:
        import onnx

        m = onnx.load(str(self.export_dir / MODEL_FILE), load_external_data=False)
        ops: dict[str, int] = {}
        for n in m.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        return {"sparse_path": "none: ORT CPU runs MatMul on dense tensors (sparse initializers are densified)",
                "matmul_nodes": ops.get("MatMul", 0) + ops.get("Gemm", 0),
                "sparse_initializers": len(m.graph.sparse_initializer)}


@ENGINES.register("ort-sparse")
class OrtSparseEngine(OrtCPUEngine):
    """The ``ort-cpu`` export with every pruned MatMul rewritten to the project's ``SparseLinear``
    custom op (:func:`sparse_runtime.kernels.ort.sparsify_onnx`), run by ORT with the compiled
    extension registered as its custom-op library (``native``; ``backend="pyop"`` for
    onnxruntime-extensions' Python op; ``pool="openmp"`` runs the native op's rows on the
    extension's OpenMP pool instead of ORT's, see :func:`sparse_runtime.kernels.ort.session`). The
    rewrite happens at load, in memory; the export on disk stays a standard dense ONNX."""

    name = "ort-sparse"
    description = "ONNX Runtime CPU, pruned MatMuls as the project's SparseLinear custom op (float32)"
    install_hint = "pip install -e . (builds the kernels, also ORT's custom-op library) and onnxruntime >= 1.16"
    exploits_sparsity = "unstructured and N:M (project kernels inside ORT)"

    @classmethod
    def check_available(cls) -> None:
        super().check_available()
        from ..kernels import available, unavailable_reason

        if not available():
            raise EngineUnavailableError(f"{cls.name} needs the compiled kernels ({unavailable_reason()}); "
                                         f"run `{cls.install_hint}`")

    def _load(self, model: str, graph_optimization: str = "all", min_sparsity: float = 0.3,
              backend: str = "native", pool: str = "ort", **export_options: Any) -> None:
        self.min_sparsity, self.backend, self.pool = min_sparsity, backend, pool
        super()._load(model, graph_optimization, **export_options)

    def _session(self):
        import onnx
        from exporters.onnx_common import ort_session_options

        from ..kernels import ort as kort

        m = onnx.load(str(self.export_dir / MODEL_FILE))  # with its external weights
        sm, self.sparse_nodes = kort.sparsify_onnx(m, min_sparsity=self.min_sparsity)
        del m
        self._calls: dict[str, int] = {}  # kernel calls made by THIS engine's runs (counters are process-wide)
        return kort.session(sm, self.threads, self.backend, pool=self.pool,
                            options=ort_session_options(self.threads, level=self.graph_optimization))

    def _counted(self, run, ids: np.ndarray) -> np.ndarray:
        """``run(ids)``, adding the kernel calls it made to this engine's count (the counters are
        process-wide; engines in one process run one at a time)."""
        from ..kernels import counters

        before = counters()
        out = run(ids)
        for k, v in counters().items():
            if v != before.get(k, 0):
                self._calls[k] = self._calls.get(k, 0) + v - before.get(k, 0)
        return out

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._counted(super().prefill, ids)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return self._counted(super().decode, ids)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "backend": self.backend, "pool": self.pool, "sparse_nodes": self.sparse_nodes}

    def evidence(self) -> dict[str, Any]:
        calls = dict(self._calls)
        return {"sparse_path": f"{self.sparse_nodes} MatMuls as SparseLinear ({self.backend} custom op); "
                               f"kernel calls by this engine {calls or 'none yet'}",
                "sparse_nodes": self.sparse_nodes, "kernel_calls": calls}
