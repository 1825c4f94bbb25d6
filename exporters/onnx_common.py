"""ONNX helpers shared by the ONNX Runtime and DeepSparse exporters: saving (external data above
2 GB), sparse initializers, weight extraction for the mask check, and ORT sessions."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

PROTOBUF_LIMIT = 2 * 1024 ** 3  # a single ONNX protobuf cannot exceed 2 GB
EXTERNAL_DATA_MODES = ("auto", "always", "never")


def tensor_bytes(model) -> int:
    import onnx

    n = 0
    for t in model.graph.initializer:
        n += len(t.raw_data) if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).nbytes
    for s in model.graph.sparse_initializer:
        n += len(s.values.raw_data) + len(s.indices.raw_data)
    return n


def save_onnx(model, path: Path, external_data: str = "auto") -> bool:
    """Save ``model``; weights go to ``<name>_data`` when forced or when the file would pass 2 GB.
    Returns whether external data was used."""
    import onnx

    use_ext = external_data == "always" or (external_data == "auto" and tensor_bytes(model) > PROTOBUF_LIMIT - 64 * 2 ** 20)
    if use_ext:
        loc = path.name + "_data"
        if (path.parent / loc).exists():
            os.remove(path.parent / loc)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=loc, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return use_ext


def load_onnx(path: Path, load_external: bool = True):
    import onnx

    return onnx.load(str(path), load_external_data=load_external)


def to_sparse_initializers(model, min_saving: float = 0.0, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Move 2-D float initializers whose COO form is smaller into ``graph.sparse_initializer``.

    ONNX stores a sparse tensor as values + int64 linear indices (the checker requires int64), so a
    float32 weight shrinks only above 2/3 sparsity (12 bytes per nonzero vs 4 per weight) and a
    float16 weight above 5/6. ONNX Runtime converts sparse initializers back to dense tensors when
    it loads the model: this saves disk and download size only, never memory or time."""
    from onnx import numpy_helper, helper

    allowed = set(names) if names is not None else None
    keep, moved, saved = [], [], 0
    for t in model.graph.initializer:
        if (allowed is not None and t.name not in allowed) or len(t.dims) != 2:
            keep.append(t)
            continue
        arr = numpy_helper.to_array(t)
        if arr.dtype.kind != "f":
            keep.append(t)
            continue
        flat = arr.reshape(-1)
        nz = np.flatnonzero(flat)
        sparse_bytes = nz.size * (arr.itemsize + 8)
        if sparse_bytes >= arr.nbytes * (1.0 - min_saving):
            keep.append(t)
            continue
        values = numpy_helper.from_array(flat[nz], t.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), t.name + "_indices")
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(arr.shape)))
        moved.append(t.name)
        saved += arr.nbytes - sparse_bytes
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return {"sparse_initializers": len(moved), "bytes_saved": int(saved)}


def sparse_initializer_array(s) -> np.ndarray:
    """One ONNX sparse initializer (COO values + linear or [nnz, rank] indices) as a dense array."""
    from onnx import numpy_helper

    vals = numpy_helper.to_array(s.values)
    idx = numpy_helper.to_array(s.indices).astype(np.int64)
    if idx.ndim == 2:  # [nnz, rank] coordinates -> linear indices
        idx = np.ravel_multi_index(idx.T, tuple(s.dims))
    dense = np.zeros(int(np.prod(s.dims)), dtype=vals.dtype)
    dense[idx] = vals
    return dense.reshape(tuple(s.dims))


def densify_sparse_initializers(model) -> int:
    """The inverse of :func:`to_sparse_initializers`: every sparse initializer back to a dense one
    of the same name (for graph rewrites that read weights). Returns how many were converted."""
    from onnx import numpy_helper

    g = model.graph
    n = len(g.sparse_initializer)
    for s in g.sparse_initializer:
        g.initializer.append(numpy_helper.from_array(sparse_initializer_array(s), s.values.name))
    del g.sparse_initializer[:]
    return n


def weight_arrays(model) -> list[np.ndarray]:
    """Every 2-D float initializer, dense or sparse, as a numpy array (for the mask check)."""
    from onnx import numpy_helper

    out = []
    for t in model.graph.initializer:
        if len(t.dims) == 2:
            a = numpy_helper.to_array(t)
            if a.dtype.kind == "f":
                out.append(a)
    out += [sparse_initializer_array(s) for s in model.graph.sparse_initializer if len(s.dims) == 2]
    return out


def ort_session(path: Path, threads: int | None = None, optimized_path: Path | None = None, level: str = "basic"):
    import onnxruntime as ort

    so = ort_session_options(threads, optimized_path, level)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_session_options(threads: int | None = None, optimized_path: Path | None = None, level: str = "basic"):
    """The project's ORT session settings: ``threads`` intra-op (default min(2, cores)), one inter-op
    thread, warnings off, graph optimisation ``level`` (none | basic | extended | all)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so.graph_optimization_level = levels[level]
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
