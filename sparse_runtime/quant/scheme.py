"""Weight quantization schemes and round-to-nearest: the grid every quantizer, packer and kernel shares.

Why one module: the quantize verb (``quant/apply.py``), the GPTQ-style solvers (``quant/gptq.py``),
the packers of the sparse and dense kernels (``kernels/layout.py``) and the engines all have to
agree on one definition of a code, a scale and a zero point, or an exported model would decode to
values its checkpoint never held. The definitions (``docs/quantization.md#schemes``):

- **symmetric** (default): codes in ``[-qmax, qmax]``, ``qmax = 2^(bits-1) - 1`` (127 for int8, 7
  for int4: the restricted range, so the grid is symmetric about zero and ``-code`` is always a
  code), ``scale = amax(kept) / qmax``;
- **asymmetric** (GPTQ's convention): the range ``[min(kept min, 0), max(kept max, 0)]`` (zero is
  always representable, as in GPTQ), codes in ``[0, 2^bits - 1]``, ``scale = range / (2^bits - 1)``,
  ``zero = round(-min / scale)``, an integer stored as float32;
- the dequantized value is ``scale * (code - zero)`` (``zero = 0`` when symmetric);
- scales (and zeros) are float32 ``[N, G]``: ``G = 1`` per output channel (``group = 0``), else
  ``K / group`` groups of consecutive input columns; a group with no kept weight (or all zero)
  gets scale 1, so nothing divides by zero.

Only the KEPT weights (the mask) set the range and are quantized; pruned weights are not stored
and stay exactly zero. A kept weight whose code dequantizes to zero stays in the mask (the
sparsity pattern and N:M groups are never changed by quantization) and is counted in
``rounded_to_zero``, never hidden.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError

GROUPS = (0, 32, 64, 128)
_NAME = re.compile(r"^int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?P<asym>-asym)?$")


@dataclass(frozen=True)
class QuantScheme:
    """``bits`` 8 or 4; ``group`` 0 (one scale per output row) or 32/64/128 columns per scale;
    ``symmetric`` or GPTQ-style asymmetric with a zero point."""

    bits: int = 8
    group: int = 0
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization bits {self.bits}: use 8 or 4")
        if self.group not in GROUPS:
            raise ConfigError(f"quantization group {self.group}: use 0 (per output channel), 32, 64 or 128")

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f"-g{self.group}" if self.group else "") + ("" if self.symmetric else "-asym")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @classmethod
    def parse(cls, text: str) -> "QuantScheme":
        """``int8``, ``int8-g128``, ``int4-g128``, ``int4-g64-asym``, ... (the names ``name`` writes)."""
        m = _NAME.match(str(text).strip().lower())
        if not m:
            raise ConfigError(f"quantization scheme {text!r}: write int8, int4-g128 or int4-g128-asym "
                              f"(bits 8 or 4, optional -g32/-g64/-g128 group, optional -asym)")
        return cls(bits=int(m["bits"]), group=int(m["group"] or 0), symmetric=m["asym"] is None)

    def n_groups(self, K: int) -> int:
        return 1 if self.group == 0 else K // self.group

    def check(self, K: int, name: str = "weight") -> None:
        """Raise ConfigError (one line, with the fix) when a row of width ``K`` cannot be grouped."""
        if self.group and K % self.group:
            raise ConfigError(f"{name}: input width {K} is not a multiple of the quantization group {self.group}; "
                              f"use a group that divides {K} (32/64/128) or per-channel scales (group 0, e.g. int8)")


@dataclass
class QuantizedWeight:
    """Codes, scales and zeros of one ``[N, K]`` weight under ``scheme``; ``mask`` marks the kept weights."""

    codes: torch.Tensor  # int8 [N, K] (uint8 when asymmetric: int8-asym codes reach 255); 0 where pruned
    scales: torch.Tensor  # float32 [N, G]
    zeros: Optional[torch.Tensor]  # float32 [N, G] (asymmetric) or None
    mask: torch.Tensor  # bool [N, K]
    scheme: QuantScheme

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        K = self.codes.shape[1]
        return t.expand(-1, K) if self.scheme.group == 0 else t.repeat_interleave(self.scheme.group, dim=1)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[N, K]``: ``scale * (code - zero)`` where kept, exactly 0 where pruned."""
        q = self.codes.float()
        if self.zeros is not None:
            q = q - self._expand(self.zeros)
        return torch.where(self.mask, q * self._expand(self.scales), torch.zeros((), dtype=torch.float32))

    @property
    def rounded_to_zero(self) -> int:
        """Kept weights whose quantized value is 0 (they stay in the mask; reported, never hidden)."""
        return int((self.mask & (self.dequantize() == 0)).sum())


def _grouped(W: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``[N, G, g]`` view of ``W`` (``g = K`` per channel)."""
    N, K = W.shape
    g = K if scheme.group == 0 else scheme.group
    return W.reshape(N, K // g, g)


CLIPS = ("none", "mse")
# GPTQ's reference quantizer (`Quantizer.find_params(mse=True)`): shrink the range by 1 - i / 100 for
# i < 80 and keep, per group, the candidate with the least sum of |error|^2.4 over its kept weights
MSE_GRID, MSE_MAXSHRINK, MSE_NORM = 100, 0.8, 2.4


def _scales_for(lo: Optional[torch.Tensor], hi: torch.Tensor, scheme: QuantScheme):
    """Scales (and zeros) of the range ``[lo, hi]`` (symmetric: ``hi`` is the amax, ``lo`` unused)."""
    if scheme.symmetric:
        return hi / scheme.qmax, None
    scales = (hi - lo) / scheme.qmax
    return scales, torch.round(-lo / torch.where(scales > 0, scales, torch.ones_like(scales)))


def _mse_shrink(Wk: torch.Tensor, mk: torch.Tensor, lo: Optional[torch.Tensor], hi: torch.Tensor,
                scheme: QuantScheme) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The range ``p * [lo, hi]`` (p from 1 down to 0.21) whose round-to-nearest error over the kept
    weights is least, per group. p = 1 comes first and wins ties, so the error never exceeds plain
    round-to-nearest's."""
    best = torch.full_like(hi, float("inf"))
    best_lo, best_hi = lo, hi
    for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
        p = 1.0 - i / MSE_GRID
        lo1, hi1 = (None if lo is None else lo * p), hi * p
        s, z = _scales_for(lo1, hi1, scheme)
        s = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(2)
        if z is None:
            q = torch.round(Wk / s).clamp_(scheme.qmin, scheme.qmax).mul_(s)
        else:
            z = z.unsqueeze(2)
            q = torch.round(Wk / s + z).clamp_(scheme.qmin, scheme.qmax).sub_(z).mul_(s)
        err = q.sub_(Wk).abs_().pow_(MSE_NORM).mul_(mk).sum(dim=2)
        better = err < best
        best = torch.where(better, err, best)
        best_hi = torch.where(better, hi1, best_hi)
        if lo is not None:
            best_lo = torch.where(better, lo1, best_lo)
    return best_lo, best_hi


def grid_params(W: torch.Tensor, scheme: QuantScheme, mask: torch.Tensor,
                clip: str = "none") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scales (and zeros) ``[N, G]`` of the kept entries of ``W`` (round-to-nearest's grid; GPTQ
    calls this per group on the updated weights). ``W`` and ``mask`` may be one group wide.

    ``clip="mse"``: the range is shrunk where that lowers the group's rounding error (GPTQ's
    reference quantizer with ``mse=True``; docs/quantization.md#clipping): large weights are clipped so
    that the many small ones land on a finer grid. Only the choice of scales changes; codes, scales
    and zeros mean what they always mean."""
    if clip not in CLIPS:
        raise ConfigError(f"quantization clip {clip!r}: use {' or '.join(CLIPS)}")
    Wk = _grouped(W.float() * mask, scheme)
    mk = _grouped(mask, scheme)
    if scheme.symmetric:
        lo, hi = None, Wk.abs().amax(dim=2)
    else:
        big = torch.finfo(torch.float32).max
        lo = torch.where(mk, Wk, torch.full_like(Wk, big)).amin(dim=2).clamp(max=0.0)
        hi = torch.where(mk, Wk, torch.full_like(Wk, -big)).amax(dim=2).clamp(min=0.0)
    if clip == "mse":
        lo, hi = _mse_shrink(Wk, mk, lo, hi, scheme)
    scales, zeros = _scales_for(lo, hi, scheme)
    empty = scales <= 0
    scales = torch.where(empty, torch.ones_like(scales), scales)
    if zeros is not None:
        zeros = torch.where(empty, torch.zeros_like(zeros), zeros)
    return scales.float().contiguous(), (None if zeros is None else zeros.float().contiguous())


def codes_from(W: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], scheme: QuantScheme,
               mask: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Round ``W`` onto the grid given by ``scales``/``zeros``: ``clamp(round(W / scale + zero))``.

    Also recovers the exact codes of a weight that is already on the grid (a quantized checkpoint
    stores the dequantized values: the rounding error of ``q * s / s`` is far below 0.5)."""
    W = W.float()
    mask = (W != 0) if mask is None else mask.bool()
    N, K = W.shape
    scheme.check(K)
    qw = QuantizedWeight(torch.zeros(N, K, dtype=torch.int8), scales.float().contiguous(),
                         None if zeros is None else zeros.float().contiguous(), mask, scheme)
    q = W / qw._expand(qw.scales)
    if qw.zeros is not None:
        q = q + qw._expand(qw.zeros)
    q = torch.round(q).clamp_(scheme.qmin, scheme.qmax)
    qw.codes = torch.where(mask, q, torch.zeros((), dtype=q.dtype)).to(torch.int8 if scheme.symmetric else torch.uint8)
    return qw


def quantize_rtn(W: torch.Tensor, scheme: QuantScheme, mask: Optional[torch.Tensor] = None,
                 clip: str = "none") -> QuantizedWeight:
    """Round-to-nearest quantization of the kept entries of ``W`` (mask default ``W != 0``);
    ``clip`` as in :func:`grid_params` (searched over row blocks, so memory stays a few copies of
    one block even for a vocabulary-sized lm_head)."""
    W = W.detach().float()
    if W.dim() != 2:
        raise ConfigError(f"quantize_rtn expects a 2-D weight, got shape {tuple(W.shape)}")
    scheme.check(W.shape[1])
    mask = (W != 0) if mask is None else mask.bool()
    if clip == "none":
        scales, zeros = grid_params(W, scheme, mask)
    else:
        rows = max(1, (1 << 22) // W.shape[1])
        parts = [grid_params(W[i:i + rows], scheme, mask[i:i + rows], clip) for i in range(0, W.shape[0], rows)]
        scales = torch.cat([p[0] for p in parts])
        zeros = None if scheme.symmetric else torch.cat([p[1] for p in parts])
    return codes_from(W, scales, zeros, scheme, mask)
