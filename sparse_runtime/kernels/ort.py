"""ONNX Runtime integration: the kernels as ORT custom ops, native by default.

:func:`sparsify_onnx` rewrites an exported graph: every ``MatMul(x, W^T)`` whose weight is a 2-D
initializer with at least ``min_sparsity`` zeros becomes ``SparseLinear(x, index, values,
row_ptr)`` (bitmask) or ``SparseLinearCsr16`` (domain ``ai.onnx.contrib``); the graph without that
rewrite stays a standard dense ONNX that any ORT runs.

:func:`session` runs a rewritten graph. Two backends implement the same node contract:

- ``native`` (default): the compiled extension is itself an ORT custom-op library. It exports
  ``RegisterCustomOps`` (``csrc/ort_op.inc``, over this project's declarations of ORT's stable C
  ABI slots in ``csrc/ort_abi.h``, since no installed package ships ORT's header), so
  ``SessionOptions.register_custom_ops_library(library_path())`` gives ORT the kernels with no
  Python in the call. Each product's rows are split over ORT's own intra-op pool into
  ``sparse_runtime.threads`` parts (a session config entry, set here from ``threads``). Needs
  onnxruntime >= 1.16 (>= 1.17 for ORT's pool; else the extension's OpenMP pool).
- ``pyop``: onnxruntime-extensions' Python custom op calling the same kernel through ctypes (one
  Python round trip per node; kept for comparison and for runtimes older than 1.16).

Evidence either way: the kernel counters (:func:`sparse_runtime.kernels.counters`) count every
node's call, since ORT loads the same shared object that ctypes loaded.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..errors import ConfigError
from . import native
from .layout import pack
from .ops import _ISA_ID, _run

DOMAIN = "ai.onnx.contrib"
OP_TYPE = "SparseLinear"  # bitmask layout (int32 mask words)
OP_TYPE_CSR16 = "SparseLinearCsr16"  # csr16 layout (int16 column indices)
BACKENDS = ("native", "pyop")
THREADS_KEY = "sparse_runtime.threads"  # session config entries read by the native op
POOL_KEY = "sparse_runtime.pool"
POOLS = ("ort", "openmp")
_registered = False


def _need_extensions():
    try:
        import onnxruntime_extensions  # noqa: F401
    except ImportError as e:
        raise ConfigError("the ORT sparse op needs onnxruntime-extensions: pip install onnxruntime-extensions") from e
    return onnxruntime_extensions


def register_pyop() -> None:
    """Register the Python implementation of ``ai.onnx.contrib::SparseLinear`` (once per process)."""
    global _registered
    if _registered:
        return
    ext = _need_extensions()
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    for op_type, index_type in ((OP_TYPE, PyCustomOpDef.dt_int32), (OP_TYPE_CSR16, PyCustomOpDef.dt_int16)):
        @onnx_op(op_type=op_type, domain=DOMAIN,
                 inputs=[PyCustomOpDef.dt_float, index_type, PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
                 outputs=[PyCustomOpDef.dt_float],
                 attrs={"out_features": PyCustomOpDef.dt_int64, "in_features": PyCustomOpDef.dt_int64,
                        "layout_id": PyCustomOpDef.dt_int64, "isa_id": PyCustomOpDef.dt_int64})
        def _sparse_linear(x, index, values, row_ptr, **kw):
            y = _run(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(index), torch.from_numpy(values),
                     torch.from_numpy(row_ptr), None, int(kw["out_features"]), int(kw["in_features"]),
                     int(kw["layout_id"]), int(kw["isa_id"]))
            return y.numpy()

    del ext
    _registered = True


def sparsify_onnx(model, *, min_sparsity: float = 0.3, isa: Optional[str] = None, layout: Optional[str] = None):
    """Return (a copy of ``model`` with sparse MatMuls replaced by SparseLinear nodes, count)."""
    import onnx
    from onnx import helper, numpy_helper

    from exporters.onnx_common import densify_sparse_initializers

    isa = native.select_isa(isa)
    layout = native.select_layout(isa, layout)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    densify_sparse_initializers(m)  # the exporters' COO option: back to dense, so those MatMuls are rewritten too
    inits = {t.name: t for t in g.initializer}
    new_nodes, count, dropped = [], 0, set()
    for node in g.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT:
            new_nodes.append(node)
            continue
        wt = numpy_helper.to_array(w)  # [K, N] = W^T
        if float((wt == 0).mean()) < min_sparsity:
            new_nodes.append(node)
            continue
        p = pack(torch.from_numpy(np.ascontiguousarray(wt.T)), layout)
        base = f"{node.name or node.output[0]}_sparse"
        g.initializer.extend([numpy_helper.from_array(p.index.numpy(), base + "_index"),
                              numpy_helper.from_array(p.values.numpy(), base + "_values"),
                              numpy_helper.from_array(p.row_ptr.numpy(), base + "_row_ptr")])
        new_nodes.append(helper.make_node(OP_TYPE if layout == "bitmask" else OP_TYPE_CSR16, [node.input[0], base + "_index", base + "_values", base + "_row_ptr"],
                                          list(node.output), name=base, domain=DOMAIN,
                                          out_features=p.out_features, in_features=p.in_features,
                                          layout_id=native.LAYOUT_IDS[layout], isa_id=_ISA_ID[isa]))
        dropped.add(node.input[1])
        count += 1
    del g.node[:]
    g.node.extend(new_nodes)
    still_used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name not in dropped or t.name in still_used]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return m, count


def session(model, threads: int = 0, backend: str = "native", options=None, pool: str = "ort"):
    """An ``InferenceSession`` that runs SparseLinear nodes (``model``: ModelProto, bytes or path).

    ``threads``: ORT's intra-op threads and the op's own (0: ORT's and OpenMP's defaults).
    ``backend``: ``native`` (the compiled library) or ``pyop`` (onnxruntime-extensions' Python op).
    ``options``: a ``SessionOptions`` to extend (e.g. with a graph optimisation level).
    ``pool`` (native): ``ort`` splits each product's rows over ORT's intra-op pool (one pool for the
    whole graph); ``openmp`` runs them on the extension's OpenMP pool (a second pool beside ORT's).
    """
    import onnxruntime as ort

    if backend not in BACKENDS:
        raise ConfigError(f"unknown ORT sparse backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if pool not in POOLS:
        raise ConfigError(f"unknown thread pool {pool!r}; choose one of {', '.join(POOLS)}")
    so = options or ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if backend == "native":
        so.add_session_config_entry(THREADS_KEY, str(threads or so.intra_op_num_threads or torch.get_num_threads()))
        so.add_session_config_entry(POOL_KEY, pool)
        try:
            so.register_custom_ops_library(native.library_path())
        except Exception as e:  # an old runtime, or a build without the entry point
            raise ConfigError(f"ONNX Runtime {ort.__version__} could not load the native SparseLinear op ({e}); "
                              f"it needs onnxruntime >= 1.16 and a current build (pip install -e .), "
                              f"or use backend='pyop'") from e
    else:
        ext = _need_extensions()
        register_pyop()
        so.register_custom_ops_library(ext.get_library_path())
    keep = None
    if hasattr(model, "SerializeToString"):
        model, keep = _session_source(model)
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])
    sess._sparse_runtime_files = keep  # a temporary directory the session's weights came from
    return sess


INLINE_LIMIT = 1 << 30  # bytes of weights above which a model goes through files (protobuf's 2 GB cap)


def _session_source(model):
    """``(bytes, None)`` for a model that fits one protobuf message; otherwise ``(path, tmpdir)``:
    the model saved by the exporters' ``save_onnx`` with its weights as external data (a 7B model's
    weights pass 2 GB)."""
    from exporters.onnx_common import save_onnx, tensor_bytes

    if tensor_bytes(model) < INLINE_LIMIT:
        return model.SerializeToString(), None
    import tempfile
    from pathlib import Path

    tmp = tempfile.TemporaryDirectory(prefix="sparse-runtime-ort-")
    path = Path(tmp.name) / "model.onnx"
    save_onnx(model, path, external_data="always")
    return path, tmp
