"""Quantized linears on the compiled kernels: int8 / int4 codes with float32 scales, in the dense or
the bitmask layout (:class:`~sparse_runtime.kernels.layout.QuantPacked`; kernels in
``csrc/quant_kernels.inc``, reached through one C descriptor, ``SRLinear``).

:class:`QuantLinear` is the torch-side object the lean engines hold for a quantized weight (one form:
the codes; no fp32 copy is kept). Its forward runs the C kernel up to ``C_MAX_TOKENS`` tokens (decode
sizes: each weight row is decoded once for all rows of x) and, for more (prefill), dequantizes the
whole weight into a shared scratch buffer and runs the GEMM: prefill is compute-bound, where the
dequantization (one pass over the codes) is small beside the product.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import native
from .layout import QuantPacked, pack_quantized

C_MAX_TOKENS = 8  # tokens up to which the C kernel runs the product (else dequantize + GEMM)


class QuantLinear:
    """``y = x W^T + b`` with ``W`` held as ``packed`` codes; ``isa`` the requested kernel path
    (``native.quant_isa`` says which runs). ``scratch``: a shared
    :class:`~sparse_runtime.kernels.module.DenseScratch` for the prefill form (else a temporary)."""

    def __init__(self, packed: QuantPacked, bias: Optional[torch.Tensor] = None, isa: Optional[str] = None,
                 scratch=None, act: str = "float32"):
        from .decode import linear_desc

        self.packed = packed
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.isa = native.select_isa(isa)
        self.scratch = scratch
        self.act = act  # "int8[-gG]": the C products quantize x to int8 (W8A8); the prefill GEMM form stays fp32
        self.desc = linear_desc(self.isa, quant=packed, bias=self.bias, act=act)
        self.shape = (packed.out_features, packed.in_features)
        self.c_calls = 0
        self.gemm_calls = 0

    @property
    def run_isa(self) -> str:
        if self.act != "float32":
            return native.w8a8_isa(self.isa, self.packed.layout)
        return native.quant_isa(self.isa, self.packed.layout)

    def dequantize(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The fp32 weight ``[N, K]`` (exactly ``scale * (code - zero)``, zeros where pruned)."""
        from .decode import densify_rows

        out = torch.empty(self.shape) if out is None else out
        return densify_rows(self.desc, out, None, torch.get_num_threads())

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the dequantized weight (a tied, quantized embedding table's lookup)."""
        from .decode import densify_rows

        flat = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).contiguous()
        out = torch.empty(flat.numel(), self.shape[1])
        densify_rows(self.desc, out, flat, 1)
        return out.view(*torch.as_tensor(ids).shape, self.shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .decode import run_linear_batch

        N, K = self.shape
        if x.shape[-1] != K:
            raise ConfigError(f"input has {x.shape[-1]} features, the quantized weight takes {K}")
        x2 = x.reshape(-1, K).float().contiguous()
        if x2.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], N)
        if x2.shape[0] <= C_MAX_TOKENS:
            y = torch.empty(x2.shape[0], N)
            run_linear_batch(self.desc, x2, y, torch.get_num_threads())
            self.c_calls += 1
            return y.view(*x.shape[:-1], N)
        w = self.scratch.get(N, K, torch.float32) if self.scratch is not None else torch.empty(N, K)
        self.dequantize(w)
        self.gemm_calls += 1
        return F.linear(x2, w, self.bias).view(*x.shape[:-1], N)


def quantize_packed(weight: torch.Tensor, scheme, layout: str, mask: Optional[torch.Tensor] = None,
                    scales: Optional[torch.Tensor] = None, zeros: Optional[torch.Tensor] = None) -> QuantPacked:
    """Quantize an fp32 weight (round to nearest under ``scheme``; or, with ``scales`` (and ``zeros``)
    from a quantized checkpoint, recover its codes exactly with ``codes_from``) and pack it. The
    mask is ``weight != 0`` unless given."""
    from ..quant.scheme import codes_from, quantize_rtn

    w = weight.detach().float()
    scheme.check(w.shape[1])
    m = (w != 0) if mask is None else mask
    qw = quantize_rtn(w, scheme, m) if scales is None else codes_from(w, scales, zeros, scheme, m)
    return pack_quantized(qw, layout)
