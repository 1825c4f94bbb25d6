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
from typing import Optional, Union

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


# ---------------------------------------------------------------------------------------------
# Quantized values: int8 / int4 codes with float32 scales (the contract of sparse_runtime.quant.scheme:
# W = scale * (code - zero)); kernels in csrc/quant_kernels.inc, layouts in docs/kernels.md.
# ---------------------------------------------------------------------------------------------
QUANT_LAYOUTS = ("dense", "bitmask")


@dataclass
class QuantPacked:
    """One quantized ``[out_features, in_features]`` weight as the kernels read it.

    ``codes`` (uint8 bytes) hold the STORED code ``u`` of each weight: int8 symmetric the code itself
    (two's complement), int8 asymmetric the code (0..255), int4 symmetric ``code + 8`` (1..15, so
    every int4 nibble is unsigned), int4 asymmetric the code; the kernels compute ``scale * (u - zq)``
    with ``zq`` = 0 / zero / 8 / zero, which is ``scale * (code - zero)`` exactly.

    - ``dense``: int8 ``[N, K]`` row-major; int4 ``[N, ceil(K/32) * 16]``: per 32-column chunk 16 bytes,
      byte j = column 32c+j (low nibble) | column 32c+16+j (high nibble). A pruned weight stores the
      code of 0 (``zero`` when asymmetric), so it decodes to exactly 0.
    - ``bitmask``: ``index`` the fp32 layout's mask (uint32 bits as int32 ``[N, ceil(K/32)]``), ``codes``
      the kept weights' codes in row order: int8 one byte each; int4 two per byte, each 32-column mask
      word's codes starting on a byte boundary (code i of a word in byte i/2, low nibble first), so a
      word is one masked load for the AVX-512 unpack; ``row_ptr`` int64 ``[N + 1]`` byte offsets.
    """

    layout: str
    out_features: int
    in_features: int
    bits: int
    group: int  # 0: one scale per row
    symmetric: bool
    codes: torch.Tensor  # uint8 [bytes]
    scales: torch.Tensor  # float32 [N, G]
    zeros: Optional[torch.Tensor]  # float32 [N, G] (asymmetric) or None
    index: Optional[torch.Tensor] = None  # bitmask: int32 [N, Kw]
    row_ptr: Optional[torch.Tensor] = None  # bitmask: int64 [N + 1] byte offsets
    kept: int = 0  # weights in the mask

    @property
    def density(self) -> float:
        total = self.out_features * self.in_features
        return self.kept / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes a batch-1 product reads: codes + mask + scales (+ zeros); row_ptr is O(N)."""
        t = [self.codes, self.scales, self.zeros, self.index]
        return int(sum(x.numel() * x.element_size() for x in t if x is not None))

    @property
    def bytes_per_weight(self) -> float:
        return self.nbytes / max(self.out_features * self.in_features, 1)

    def bandwidth_bound(self, baseline_bytes_per_weight: float = 4.0) -> float:
        """Baseline bytes / these bytes (4.0: over dense fp32; pass 1.0 or 0.5 + scales for dense int8/int4)."""
        return baseline_bytes_per_weight / max(self.bytes_per_weight, 1e-12)


def _stored_codes(qw) -> np.ndarray:
    """uint8 ``[N, K]`` stored codes ``u`` of a QuantizedWeight (see QuantPacked)."""
    c = qw.codes.numpy()
    if qw.scheme.bits == 8:
        return c.view(np.uint8) if c.dtype == np.int8 else c.astype(np.uint8)
    u = c.astype(np.int16) + (8 if qw.scheme.symmetric else 0)
    return u.astype(np.uint8)


def pack_quantized(qw, layout: str = "bitmask") -> QuantPacked:
    """Pack a :class:`~sparse_runtime.quant.scheme.QuantizedWeight` (codes, scales, zeros, mask) into
    ``layout`` (``dense`` or ``bitmask``). The mask is ``qw.mask`` (from the fp32 weight, never from
    the codes: a kept weight whose code dequantizes to 0 stays kept)."""
    if layout not in QUANT_LAYOUTS:
        raise ConfigError(f"unknown quantized layout {layout!r}; choose one of {', '.join(QUANT_LAYOUTS)}")
    sch = qw.scheme
    n, k = qw.codes.shape
    sch.check(k)
    u = _stored_codes(qw)
    mask = qw.mask.numpy().astype(bool)
    zeros = None if qw.zeros is None else qw.zeros.detach().float().contiguous()
    common = dict(out_features=n, in_features=k, bits=sch.bits, group=sch.group, symmetric=sch.symmetric,
                  scales=qw.scales.detach().float().contiguous(), zeros=zeros, kept=int(mask.sum()))
    if layout == "dense":
        # a pruned weight must decode to exactly 0: store the code of 0 (zq) there
        zq = (np.zeros((n, 1)) if zeros is None else zeros.numpy()) + (8 if sch.bits == 4 and sch.symmetric else 0)
        zfull = np.broadcast_to(zq, (n, k)) if zq.shape[1] == 1 else np.repeat(zq, sch.group, axis=1)
        u = np.where(mask, u, zfull.astype(np.int64) & 0xFF).astype(np.uint8)
        if sch.bits == 8:
            return QuantPacked("dense", codes=torch.from_numpy(u.reshape(-1).copy()), **common)
        kc = (k + 31) // 32
        up = np.zeros((n, kc * 32), dtype=np.uint8)
        up[:, :k] = u
        up = up.reshape(n, kc, 2, 16)
        packed = (up[:, :, 0, :] | (up[:, :, 1, :] << 4)).astype(np.uint8)
        return QuantPacked("dense", codes=torch.from_numpy(packed.reshape(-1).copy()), **common)
    kw = (k + 31) // 32
    padded = np.zeros((n, kw * 32), dtype=bool)
    padded[:, :k] = mask
    words = np.packbits(padded, axis=1, bitorder="little").view("<u4").view(np.int32).reshape(n, kw)
    v = u[mask]  # kept codes, row-major
    counts = padded.reshape(n * kw, 32).sum(1)  # kept per mask word
    if sch.bits == 8:
        nb = counts
        codes = v.astype(np.uint8)
    else:
        nb = (counts + 1) // 2
        woff = np.concatenate([[0], np.cumsum(nb)])  # byte offset of each word
        wstart = np.concatenate([[0], np.cumsum(counts)])  # index in v of each word's first code
        wid = np.repeat(np.arange(n * kw), counts)
        i = np.arange(v.size) - wstart[wid]  # rank of each code within its word
        pos = woff[wid] + i // 2
        codes = np.zeros(int(woff[-1]), dtype=np.uint8)
        even = (i & 1) == 0
        codes[pos[even]] = v[even]
        codes[pos[~even]] |= (v[~even] << 4).astype(np.uint8)
    rows = nb.reshape(n, kw).sum(1)
    rp = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(rows, out=rp[1:])
    return QuantPacked("bitmask", codes=torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)),
                       index=torch.from_numpy(words.copy()), row_ptr=torch.from_numpy(rp), **common)
