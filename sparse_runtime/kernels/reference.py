"""Pure-NumPy reference for the sparse kernels: what ``y = x W^T + b`` means for a packed layout.

It decodes the layout row by row through ``row_ptr`` (so a wrong offset, bit order or index in a
packed weight shows up here exactly as it would in the C kernels) and accumulates in float64, so
the kernels' float32 results can be compared within fp32 tolerance. Slow by design: tests only.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .layout import PackedWeight, QuantPacked, mask_of


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


def quant_decode_row(p: QuantPacked, r: int) -> np.ndarray:
    """Row ``r`` of a quantized layout dequantized (float32 ``[K]``, ``scale * (u - zq)`` computed in
    float32 as the contract's ``dequantize`` does), read from the packed bytes word by word."""
    K = p.in_features
    codes = p.codes.numpy()
    G = 1 if p.group == 0 else K // p.group
    gs = K if p.group == 0 else p.group
    col_group = np.arange(K) // max(gs, 1)
    zrow = np.zeros(G, np.float32) if p.zeros is None else p.zeros.numpy()[r]
    zq = (zrow + (8 if p.bits == 4 and p.symmetric else 0)).astype(np.float32)
    sc = p.scales.numpy()[r].astype(np.float32)
    signed = p.bits == 8 and p.symmetric
    out = np.zeros(K, np.float32)
    if p.layout == "dense":
        if p.bits == 8:
            u = codes[r * K:(r + 1) * K]
        else:
            kc = (K + 31) // 32
            b = codes[r * kc * 16:(r + 1) * kc * 16].reshape(kc, 16)
            u = np.concatenate([b & 15, b >> 4], axis=1).reshape(-1)[:K]  # chunk c: cols 32c..32c+15, then +16..+31
        uf = (u.view(np.int8) if signed else u).astype(np.float32)
        return (sc[col_group] * (uf - zq[col_group])).astype(np.float32)
    kw = (K + 31) // 32
    words = p.index.numpy().view(np.uint32)[r]
    pos = int(p.row_ptr.numpy()[r])
    for w in range(kw):
        cols = [32 * w + j for j in range(32) if (int(words[w]) >> j) & 1]
        c = len(cols)
        if p.bits == 8:
            u = codes[pos:pos + c]
            pos += c
        else:
            nb = (c + 1) // 2
            byt = codes[pos:pos + nb]
            u = np.array([(byt[i // 2] >> (4 * (i & 1))) & 15 for i in range(c)], dtype=np.uint8)
            pos += nb
        if c:
            cc = np.array(cols)
            uf = (u.view(np.int8) if signed else u).astype(np.float32)
            out[cc] = sc[col_group[cc]] * (uf - zq[col_group[cc]])
    assert pos == int(p.row_ptr.numpy()[r + 1]), f"row {r}: decoded {pos} bytes, row_ptr says {p.row_ptr[r + 1]}"
    return out


def quant_decode(p: QuantPacked) -> np.ndarray:
    """The whole quantized weight, float32 ``[N, K]`` (row by row from the layout)."""
    return np.stack([quant_decode_row(p, r) for r in range(p.out_features)]) if p.out_features else \
        np.zeros((0, p.in_features), np.float32)


def reference_qlinear(x: np.ndarray, p: QuantPacked, bias: Optional[np.ndarray] = None) -> np.ndarray:
    """``x`` [..., K] float32 -> [..., N] float32 through the quantized layout (float64 sums)."""
    x = np.asarray(x, dtype=np.float32)
    lead = x.shape[:-1]
    y = x.reshape(-1, p.in_features).astype(np.float64) @ quant_decode(p).astype(np.float64).T
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64)
    return y.astype(np.float32).reshape(*lead, p.out_features)


W8A8_MAX_K = 65536  # csrc/w8a8.inc kA8MaxK: every int32 partial sum stays in range


def w8a8_eligible(p: QuantPacked, act: str = "int8") -> Optional[str]:
    """None when ``p`` can run with int8 activations ``act`` (``int8``: one scale per token;
    ``int8-g64`` / ``int8-g128``: per 64 / 128 columns), else why not: int8 symmetric codes with one
    scale per row, dense or bitmask (W8A8, csrc/w8a8.inc), or int4 dense codes of any group, symmetric
    or with zero points, with one scale per token (W4A8, csrc/w4a8.inc); at most ``W8A8_MAX_K`` inputs."""
    if p.bits == 4:
        if p.layout != "dense" or act != "int8":
            return ("int8 activations with int4 codes (W4A8) take dense codes and one activation scale per "
                    f"token (got the {p.layout} layout, --act-dtype {act})")
    elif p.bits != 8 or not p.symmetric or p.group != 0:
        return (f"int8 activations need int8 symmetric codes with one scale per row (got int{p.bits}"
                f"{'' if p.group == 0 else f'-g{p.group}'}{'' if p.symmetric else '-asym'})")
    if p.in_features > W8A8_MAX_K:
        return f"int8 activations take at most {W8A8_MAX_K} inputs (got {p.in_features})"
    return None


def quantize_activations(x: np.ndarray, group: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One token's ``x`` [K] float32 -> (``q`` int8 codes as int64 [K], ``s`` float32 [K]: each
    column's scale) by the W8A8 contract of csrc/w8a8.inc, with one scale for the token (``group`` 0)
    or per ``group`` columns (the last group may be partial): ``amax = max |x|`` over the group,
    ``q = round-half-even(x * (127 / amax))`` in fp32, clamped to [-127, 127], ``s = amax / 127``
    (0 for a zero group; NaN everywhere, with q = 0, for an x holding a NaN or an infinity)."""
    x = np.asarray(x, dtype=np.float32)
    K = x.shape[0]
    q = np.zeros(K, np.int64)
    s = np.zeros(K, np.float32)
    if not np.all(np.isfinite(x)):
        return q, np.full(K, np.nan, np.float32)
    g = group or max(K, 1)
    for k0 in range(0, K, g):
        seg = x[k0:k0 + g]
        amax = np.float32(np.abs(seg).max())
        if amax == 0:
            continue
        inv = np.float32(127) / amax
        q[k0:k0 + g] = np.clip(np.rint(seg * inv), -127, 127)  # np.rint: half to even, as cvtps2dq
        s[k0:k0 + g] = np.float32(amax / np.float32(127))
    return q, s


def _int_codes(p: QuantPacked) -> np.ndarray:
    """The integer codes [N, K] (symmetric: pruned 0; asymmetric: the stored codes, 0..2^bits - 1, before
    the zero point is subtracted: a zero weight holds the zero point), recovered exactly from the
    layout's decoded weights, scales and zero points (``codes_from``, as for a quantized checkpoint,
    every position rounded: an asymmetric code that decodes to 0 is its zero point, not 0)."""
    import torch

    from ..quant.scheme import QuantScheme, codes_from

    w = torch.from_numpy(quant_decode(p))
    every = torch.ones(w.shape, dtype=torch.bool)
    scheme = QuantScheme(p.bits, p.group, p.symmetric)
    return codes_from(w, p.scales, p.zeros, scheme, mask=every).codes.numpy().astype(np.int64)


def reference_w8a8(x: np.ndarray, p: QuantPacked, bias: Optional[np.ndarray] = None, group: int = 0) -> np.ndarray:
    """``x`` [..., K] float32 -> [..., N] float32 with int8 activations (W8A8), one scale per token
    (``group`` 0) or per ``group`` columns. Per token, exactly the C kernels' arithmetic:
    ``(float)(sum code * q) * (sx * scale) + bias`` in fp32 with an exact integer sum (the kernels
    equal it bit for bit); grouped, each group's integer sum times its scale summed in float64 (the
    kernels sum the groups in fp32, so they agree to fp32 rounding). int4 codes (W4A8, one activation
    scale per token): ``(sum over weight groups of scale * (sum code * q)) * sx + bias``, the groups
    summed in float64 (the kernels: fp32, in their own order)."""
    why = w8a8_eligible(p, "int8" if group == 0 else f"int8-g{group}")
    if why:
        raise ValueError(why)
    x = np.asarray(x, dtype=np.float32)
    lead = x.shape[:-1]
    xs = x.reshape(-1, p.in_features)
    codes = _int_codes(p)
    scales = p.scales.numpy().reshape(-1).astype(np.float32)
    b = None if bias is None else np.asarray(bias, dtype=np.float32)
    out = np.empty((xs.shape[0], p.out_features), np.float32)
    for i, row in enumerate(xs):
        q, s = quantize_activations(row, group)
        if p.bits == 4:
            G = p.group or p.in_features
            sc = p.scales.numpy().astype(np.float64).reshape(p.out_features, -1)
            zr = None if p.zeros is None else p.zeros.numpy().astype(np.int64).reshape(p.out_features, -1)
            acc = np.zeros(p.out_features, np.float64)
            for g, k0 in enumerate(range(0, p.in_features, G)):
                c = codes[:, k0:k0 + G] if zr is None else codes[:, k0:k0 + G] - zr[:, g:g + 1]
                acc += sc[:, g] * (c @ q[k0:k0 + G])  # each group's sum exact
            out[i] = (acc * np.float64(s[0])).astype(np.float32)
        elif group == 0:
            acc = (codes @ q).astype(np.int32).astype(np.float32)
            out[i] = acc * (s[0] * scales)
        else:
            K = p.in_features
            acc = np.zeros(p.out_features, np.float64)
            for k0 in range(0, K, group):
                part = codes[:, k0:k0 + group] @ q[k0:k0 + group]  # exact
                acc += part * np.float64(s[k0])
            out[i] = (acc * scales.astype(np.float64)).astype(np.float32)
        if b is not None:
            out[i] = out[i] + b
    return out.reshape(*lead, p.out_features)
