"""Compressed weight layouts the CPU kernels read (packed once, at load time).

Why two layouts: batch-1 decode is memory-bound, so the bytes read per output decide speed.

``bitmask`` (AVX-512 and portable paths): 1 bit per weight plus the packed nonzeros.
    mask    uint32 [N, ceil(K / 32)]  bit j of word w <=> column 32 w + j is nonzero; K is padded
                                      to a multiple of 32 in the mask only (pad bits are 0), so a
                                      16-bit half of a word drives one 16-lane expand-load
    values  float32 [nnz]             nonzeros of row 0, then row 1, ... (row-major, unpadded)
    row_ptr int64 [N + 1]             offset of each row's first value
    Bytes per weight at density d: 4 d + 1/8, so the batch-1 bound over dense fp32 is
    4 / (4 d + 0.125) = 3.0x at 70 % sparsity (docs/protocols.md#the-memory-bandwidth-bound).

``csr16`` (AVX2 path; AVX2 has no expand instruction, so x is gathered by column index):
    idx     uint16 [nnz] (stored as an int16 tensor; same bits), values / row_ptr as above.
    Bytes per weight: 6 d, a bound of 2.2x at 70 %; needs K <= 65536.

Alignment: each array is its own tensor (torch allocates 64-byte aligned); rows are NOT padded,
because padding every row to a cache line costs bytes at every sparsity, and the kernels use
unaligned loads that cost nothing extra on current x86 cores when data is in cache.

Values are copied bit-exactly (fp32 in, fp32 out): a weight is "nonzero" iff ``w != 0`` (so -0.0
is dropped, NaN is kept).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from ..errors import ConfigError

LAYOUTS = ("bitmask", "csr16")


@dataclass
class PackedWeight:
    """One packed ``[out_features, in_features]`` weight. ``index`` is the mask or the indices."""

    layout: str
    out_features: int
    in_features: int
    index: torch.Tensor  # bitmask: int32 [N, Kw] (uint32 bits); csr16: int16 [nnz] (uint16 bits)
    values: torch.Tensor  # float32 or bfloat16 [nnz]
    row_ptr: torch.Tensor  # int64 [N + 1]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        total = self.out_features * self.in_features
        return self.nnz / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes a batch-1 product reads from the encoding (index + values; row_ptr is O(N))."""
        return int(self.index.numel() * self.index.element_size() + self.values.numel() * self.values.element_size())

    def bandwidth_bound(self) -> float:
        """Dense fp32 bytes / encoding bytes: the most a memory-bound batch-1 product can gain."""
        return 4.0 * self.out_features * self.in_features / max(self.nbytes, 1)

    def to_dense(self) -> torch.Tensor:
        return unpack(self)


VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _as_values(weight: Union[torch.Tensor, np.ndarray], value_dtype: str = "float32") -> torch.Tensor:
    """The weight in the stored value dtype. fp32 is copied bit-exactly; bf16 values are the fp32
    weights rounded to nearest-even (or a bf16 weight as is), zeros decided AFTER rounding."""
    w = torch.as_tensor(weight).detach()
    if w.dim() != 2:
        raise ConfigError(f"a packed weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if value_dtype not in VALUE_DTYPES:
        raise ConfigError(f"unknown value dtype {value_dtype!r}; choose one of {', '.join(VALUE_DTYPES)}")
    if value_dtype == "float32" and w.dtype != torch.float32:
        raise ConfigError(f"the sparse kernels take float32 weights, got {w.dtype}; load the model with dtype=float32 "
                          "or pack with value_dtype='bfloat16'")
    if value_dtype == "bfloat16" and w.dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"bf16 packing takes float32 or bfloat16 weights, got {w.dtype}")
    return w.cpu().to(VALUE_DTYPES[value_dtype]).contiguous()


def _kept_values(w: torch.Tensor, nz: torch.Tensor) -> torch.Tensor:
    """``w[nz]`` (row-major order) without torch's int64 index of every kept element (16 bytes per
    nonzero: 430 MB for one fused 7B MLP weight): NumPy's boolean compress on the raw bits."""
    raw = {2: torch.int16, 4: torch.int32}[w.element_size()]
    return torch.from_numpy(w.view(raw).numpy()[nz.numpy()]).view(w.dtype)


def _row_ptr(nz: torch.Tensor) -> torch.Tensor:
    rp = torch.zeros(nz.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(nz.sum(1, dtype=torch.int64), 0, out=rp[1:])
    return rp


def pack_bitmask(weight: Union[torch.Tensor, np.ndarray], value_dtype: str = "float32") -> PackedWeight:
    w = _as_values(weight, value_dtype)
    n, k = w.shape
    nz = w != 0
    kw = (k + 31) // 32
    padded = np.zeros((n, kw * 32), dtype=bool)
    padded[:, :k] = nz.numpy()
    mask = np.packbits(padded, axis=1, bitorder="little").view("<u4").view(np.int32).reshape(n, kw)
    return PackedWeight("bitmask", n, k, torch.from_numpy(mask.copy()), _kept_values(w, nz), _row_ptr(nz))


def pack_csr16(weight: Union[torch.Tensor, np.ndarray], value_dtype: str = "float32") -> PackedWeight:
    w = _as_values(weight, value_dtype)
    n, k = w.shape
    if k > 65536:
        raise ConfigError(f"csr16 stores 16-bit column indices, so in_features must be <= 65536 (got {k}); "
                          "use the bitmask layout")
    nz = w != 0
    cols = nz.nonzero()[:, 1].numpy().astype(np.uint16).view(np.int16)
    return PackedWeight("csr16", n, k, torch.from_numpy(cols.copy()), _kept_values(w, nz), _row_ptr(nz))


PACKERS = {"bitmask": pack_bitmask, "csr16": pack_csr16}


def pack(weight, layout: str, value_dtype: str = "float32") -> PackedWeight:
    if layout not in PACKERS:
        raise ConfigError(f"unknown sparse layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return PACKERS[layout](weight, value_dtype)


def mask_of(p: PackedWeight) -> np.ndarray:
    """Boolean [N, K] nonzero pattern decoded from the layout (NumPy, for the reference and tests)."""
    if p.layout == "bitmask":
        bits = np.unpackbits(p.index.numpy().view(np.uint8).reshape(p.out_features, -1), axis=1, bitorder="little")
        return bits[:, : p.in_features].astype(bool)
    m = np.zeros((p.out_features, p.in_features), dtype=bool)
    rows = np.repeat(np.arange(p.out_features), np.diff(p.row_ptr.numpy()))
    m[rows, p.index.numpy().view(np.uint16).astype(np.int64)] = True
    return m


def unpack(p: PackedWeight) -> torch.Tensor:
    """The dense float32 weight the layout encodes (zeros where pruned; bf16 values widened)."""
    dense = np.zeros((p.out_features, p.in_features), dtype=np.float32)
    dense[mask_of(p)] = p.values.float().numpy()
    return torch.from_numpy(dense)
