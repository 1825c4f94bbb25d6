"""ONNX Runtime integration, interim: the kernel as an onnxruntime-extensions Python custom op.

A native ORT custom-op library needs ORT's C API header (``onnxruntime_c_api.h``), which the
``onnxruntime`` wheel does not ship and no PyPI package provides (see docs/kernels.md for the
plan). Until then this module offers the same kernel through onnxruntime-extensions' PyOp
mechanism: ``SparseLinear`` nodes (domain ``ai.onnx.contrib``) whose Python implementation hands
the tensors' buffers to the compiled kernel. It is correct and runs the sparse path (the kernel
counters prove it), but every node pays a Python round trip (tens of microseconds), so it only pays
off on large layers; it is NOT the fast path the issue asks for.

:func:`sparsify_onnx` rewrites an exported graph: every ``MatMul(x, W^T)`` whose weight is a 2-D
initializer with at least ``min_sparsity`` zeros becomes ``SparseLinear(x, index, values,
row_ptr)``; the graph without that rewrite stays a standard dense ONNX.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..errors import ConfigError
from . import _lib
from .layout import pack
from .ops import _ISA_ID, _run

DOMAIN = "ai.onnx.contrib"
OP_TYPE = "SparseLinear"  # bitmask layout (int32 mask words)
OP_TYPE_CSR16 = "SparseLinearCsr16"  # csr16 layout (int16 column indices)
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

    isa = _lib.select_isa(isa)
    layout = _lib.select_layout(isa, layout)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
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
                                          layout_id=_lib.LAYOUT_IDS[layout], isa_id=_ISA_ID[isa]))
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


def session(model, threads: int = 0):
    """An ``InferenceSession`` with the SparseLinear op available (model: ModelProto or path)."""
    import onnxruntime as ort

    ext = _need_extensions()
    register_pyop()
    so = ort.SessionOptions()
    so.register_custom_ops_library(ext.get_library_path())
    if threads:
        so.intra_op_num_threads = threads
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
