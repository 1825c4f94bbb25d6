"""Pure-NumPy reference for the sparse kernels: what ``y = x W^T + b`` means for a packed layout.

It decodes the layout row by row through ``row_ptr`` (so a wrong offset, bit order or index in a
packed weight shows up here exactly as it would in the C kernels) and accumulates in float64, so
the kernels' float32 results can be compared within fp32 tolerance. Slow by design: tests only.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .layout import PackedWeight, mask_of


def reference_linear(x: np.ndarray, packed: PackedWeight, bias: Optional[np.ndarray] = None) -> np.ndarray:
    """``x`` [..., K] float32 -> [..., N] float32."""
    x = np.asarray(x, dtype=np.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.in_features).astype(np.float64)
    mask = mask_of(packed)
    rp = packed.row_ptr.numpy()
    vals = packed.values.double().numpy()
    y = np.zeros((x2.shape[0], packed.out_features), dtype=np.float64)
    for r in range(packed.out_features):
        cols = np.flatnonzero(mask[r])
        v = vals[rp[r]:rp[r + 1]]
        assert cols.size == v.size, f"row {r}: {cols.size} mask bits but {v.size} values"
        if cols.size:
            y[:, r] = x2[:, cols] @ v
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64)
    return y.astype(np.float32).reshape(*lead, packed.out_features)
