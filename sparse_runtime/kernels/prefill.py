"""Prefill products of packed sparse weights on the bf16 GEMM (oneDNN, AMX tiles where the CPU has them).

Why: at 64+ tokens a product is compute-bound. On this project's Sapphire Rapids machine torch's
fp32 GEMM runs ~140 GFLOP/s on one thread and its bf16 GEMM ~600 (AMX); our sparse kernel at 70 %
is 1.0-1.7x over the fp32 GEMM (docs/kernels.md), so a dense bf16 GEMM on the rebuilt weight beats
both, provided the rebuild is cheap. The rebuild is one C kernel (``sr_bitmask_densify_bf16`` /
``sr_csr16_densify_bf16``, csrc/densify.cpp) writing the bf16 weight straight into a shared scratch
buffer (no fp32 staging), so a sparse model's prefill costs a dense bf16 prefill plus the rebuild.

Numerics: the activations are rounded to bf16 (and the weights, when the values are fp32), oneDNN
accumulates in fp32 and writes bf16, which is widened to fp32 before the fp32 bias is added. The
result equals ``F.linear(x.bfloat16(), W.bfloat16()).float() + bias`` exactly and differs from the
fp32 product by bf16 rounding, so this path is OPT-IN (the lean engines' ``prefill_dtype``); fp32
stays the default and exact.

On CPUs with AMX the ``amx`` form fuses the two (``sr_amx_bitmask_linear``, csrc/amx_prefill.cpp):
each thread rebuilds 32 weight rows at a time into a cache-resident bf16 block that feeds the AMX
tiles straight away, so only the packed bytes cross the memory bus and no dense weight is written
anywhere; the output stays fp32 (no bf16 rounding of y). It also runs int8 bitmask codes
(:func:`amx_quant_linear`), dequantized in registers. ``SPARSE_RUNTIME_AMX=0`` turns it off.

On CPUs with AVX512-BF16 but no AMX (AMD Zen 4) the ``bf16walk`` form does the same job in vector
registers (:func:`bf16_walk_linear`, csrc/bf16_walk.inc): the nonzeros of a row in pairs, two
multiply-adds per lane per ``vdpbf16ps``, with the AMX form's contract and glue.

Which form a product takes is measured (:func:`choose_prefill_form`): the sparse kernel, the fp32
rebuild + fp32 GEMM, the bf16 rebuild + bf16 GEMM, the AMX form and the bf16 walk, timed alternately
at the token bucket, per (ISA, layout, value dtype, shape, density, threads, bucket), cached for the
process like ``module.measure_dispatch``.
"""
from __future__ import annotations

import ctypes
import functools
import os
import statistics
import time
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import native
from .layout import PackedWeight

PREFILL_FORMS = ("sparse", "float32", "bfloat16", "amx", "bf16walk")
VAL_DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1}  # SR_VAL_F32 / SR_VAL_BF16
VAL_INT8 = 2  # SR_VAL_I8: int8 codes (the AMX form, the bf16 walk)
VAL_INT4 = 3  # SR_VAL_I4: int4 codes (the bf16 walk)
ENV_AMX = "SPARSE_RUNTIME_AMX"  # "0": never the AMX form (to compare, or to rule it out)
ENV_BF16_WALK = "SPARSE_RUNTIME_BF16_WALK"  # "0": never the bf16 walk
_FORM_CACHE: dict[tuple, tuple[str, dict[str, float]]] = {}


def densify_bf16_available() -> bool:
    lb = native._load()
    return lb is not None and hasattr(lb, "sr_bitmask_densify_bf16")


def densify_isa(packed: PackedWeight, isa: Optional[str] = None) -> str:
    """The ISA path that rebuilds ``packed`` into bf16: ``isa`` (or $SPARSE_RUNTIME_KERNEL_ISA, else
    the best the CPU runs) when it supports this layout and value dtype, else the next lower one
    (AVX-512 bitmask with bf16 values needs VBMI2; without it AVX2 does the rebuild)."""
    if not densify_bf16_available():
        raise ConfigError(native.unavailable_reason() or "the compiled kernels predate the bf16 rebuild "
                          "(sr_bitmask_densify_bf16): rebuild with pip install -e .")
    if packed.values.dtype not in VAL_DTYPE_IDS:
        raise ConfigError(f"packed values must be float32 or bfloat16, got {packed.values.dtype}")
    first = native.select_isa(isa)
    lb, lay, vd = native.lib(), native.LAYOUT_IDS[packed.layout], VAL_DTYPE_IDS[packed.values.dtype]
    for name in reversed(native.ISAS[:native.ISAS.index(first) + 1]):
        if lb.sr_densify_bf16_supported(native.ISAS.index(name), lay, vd):
            return name
    raise ConfigError(f"no bf16 rebuild for {packed.layout} with {packed.values.dtype} values on this CPU")


def densify_bf16_into(packed: PackedWeight, out: torch.Tensor, threads: Optional[int] = None,
                      isa: Optional[str] = None) -> torch.Tensor:
    """Write the dense ``[N, K]`` bf16 weight of ``packed`` into ``out`` (contiguous bf16); returns
    ``out``. fp32 values are rounded to nearest even exactly as ``.to(torch.bfloat16)``; bf16 values
    are copied. One C call, OpenMP over row blocks with ``threads`` (default: torch's)."""
    n, k = packed.out_features, packed.in_features
    if out.dtype != torch.bfloat16 or tuple(out.shape) != (n, k) or not out.is_contiguous():
        raise ConfigError(f"densify_bf16_into needs a contiguous bfloat16 [{n}, {k}] output, "
                          f"got {out.dtype} {tuple(out.shape)}")
    if n == 0 or k == 0:
        return out
    name = densify_isa(packed, isa)
    lb = native.lib()
    fn = lb.sr_bitmask_densify_bf16 if packed.layout == "bitmask" else lb.sr_csr16_densify_bf16
    rc = fn(native.ISAS.index(name), k, n, packed.index.data_ptr(), packed.values.data_ptr(),
            VAL_DTYPE_IDS[packed.values.dtype], packed.row_ptr.data_ptr(), out.data_ptr(),
            int(threads or torch.get_num_threads()))
    if rc != 0:
        raise ConfigError(f"bf16 rebuild ({name}, {packed.layout}) failed: {native.ERRORS.get(rc, rc)}")
    return out


def bf16_prefill_linear(packed: PackedWeight, bias: Optional[torch.Tensor], x: torch.Tensor, scratch,
                        threads: Optional[int] = None, isa: Optional[str] = None) -> torch.Tensor:
    """``y = x W^T + bias`` in fp32 from a bf16 GEMM: W rebuilt into ``scratch`` (a
    :class:`~sparse_runtime.kernels.module.DenseScratch`, shared by a model's products), x rounded
    to bf16, ``F.linear`` in bf16 (fp32 accumulation), the result widened and the fp32 bias added
    in fp32 (one fused op). Equals ``F.linear(x.bfloat16(), W.bfloat16()).float() + bias``."""
    if x.shape[-1] != packed.in_features:
        raise ConfigError(f"prefill linear expects {packed.in_features} input features, got shape {tuple(x.shape)}")
    w = densify_bf16_into(packed, scratch.get(packed.out_features, packed.in_features, torch.bfloat16), threads, isa)
    y = F.linear(x.to(torch.bfloat16), w)
    if bias is None:
        return y.float()
    return torch.add(y, bias.float())  # bf16 + fp32 promotes to fp32: the widening and the add in one pass


@functools.lru_cache(maxsize=None)
def bf16_arithmetic() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), as torch's kernels see it.
    Without it a bf16 prefill gains nothing and loses time converting (torch emulates bf16 in fp32):
    the lean engines then keep fp32 where the choice is theirs (attention). Asked once per process
    (every prefill asks)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(callable(c) for c in checks):
        return True  # a torch without the probes: keep the bf16 path as asked
    return any(c() for c in checks)


def amx_available() -> bool:
    """Whether the AMX form runs here: the compiled kernels have it, the CPU has AMX-TILE, AMX-BF16,
    AVX512-VBMI2 and AVX512-BF16, Linux granted the tile state, and ``SPARSE_RUNTIME_AMX`` is not 0."""
    lb = native._load()
    return (os.environ.get(ENV_AMX, "1") != "0" and lb is not None and hasattr(lb, "sr_amx_bitmask_linear")
            and bool(lb.sr_amx_supported()))


IN_PLAIN, IN_RMSNORM, IN_SILU_MUL = 0, 1, 2  # the C enum SR_IN_*
AVX2_PREFILL_MIN = 16  # the AVX2 prefill walk's first batch (kAvx2BlkMinBatch in csrc/sparse_kernels.cpp)


def _glue_io(n: int, k: int, x: torch.Tensor, norm: Optional[torch.Tensor], silu_mul: bool,
             residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int, Optional[torch.Tensor]]:
    """The fused forms' common argument checks: x as contiguous fp32 rows [m, K] (or [m, 2K] with
    ``silu_mul``), the output (``residual`` itself, or a new [m, n] tensor), the input kind (IN_*)
    and the norm weight."""
    width = 2 * k if silu_mul else k
    if x.shape[-1] != width:
        raise ConfigError(f"prefill linear expects {width} input features, got shape {tuple(x.shape)}")
    if norm is not None and silu_mul:
        raise ConfigError("one input transform at a time: norm or silu_mul")
    x2 = x.reshape(-1, width).float().contiguous()
    m = x2.shape[0]
    if residual is not None:
        if residual.dtype != torch.float32 or not residual.is_contiguous() or residual.numel() != m * n:
            raise ConfigError(f"residual must be a contiguous float32 tensor of {m} x {n} values, got "
                              f"{residual.dtype} {tuple(residual.shape)}")
        y = residual
    else:
        y = torch.empty(m, n, dtype=torch.float32)
    kind = IN_RMSNORM if norm is not None else IN_SILU_MUL if silu_mul else IN_PLAIN
    return x2, y, kind, None if norm is None else norm.float().contiguous()


def _glue_out(y: torch.Tensor, x: torch.Tensor, n: int, residual: Optional[torch.Tensor]) -> torch.Tensor:
    return y.view(*residual.shape) if residual is not None else y.reshape(*x.shape[:-1], n)


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _fused_bf16_run(n: int, k: int, x: torch.Tensor, index, values, vtype: int, row_ptr, group: int, scales, zeros,
                    bias: Optional[torch.Tensor], threads: Optional[int], norm: Optional[torch.Tensor] = None,
                    eps: float = 0.0, silu_mul: bool = False, residual: Optional[torch.Tensor] = None,
                    walk: bool = False) -> torch.Tensor:
    """One product of the fused bf16 forms, which share a C contract: the AMX form
    (``sr_amx_bitmask_linear``) or, with ``walk``, the bf16 walk (``sr_bf16_walk_linear``)."""
    if walk and not bf16_walk_available():
        raise ConfigError("the bf16 prefill walk needs a CPU with AVX512-BF16 and AVX512-VBMI2 (AMD Zen 4, Intel "
                          "Cooper Lake or later); use another form")
    if not walk and not amx_available():
        raise ConfigError("the AMX prefill form needs a CPU with AMX-BF16 (Sapphire Rapids or later) and Linux "
                          ">= 5.16; use another form")
    x2, y, kind, w = _glue_io(n, k, x, norm, silu_mul, residual)
    b = None if bias is None else bias.float().contiguous()
    lb = native.lib()
    fn = lb.sr_bf16_walk_linear if walk else lb.sr_amx_bitmask_linear
    rc = fn(x2.shape[0], k, n, x2.data_ptr(), _ptr(index), _ptr(values), vtype, _ptr(row_ptr), group, _ptr(scales),
            _ptr(zeros), _ptr(b), y.data_ptr(), kind, _ptr(w), float(eps), int(residual is not None),
            int(threads or torch.get_num_threads()))
    if rc != 0:
        raise ConfigError(f"{'bf16 walk' if walk else 'AMX'} prefill product failed: {native.ERRORS.get(rc, rc)}")
    return _glue_out(y, x, n, residual)


WALK_ISAS = ("avx2", "avx512")  # the paths whose prefill-sized batches take the AVX2 walk


def avx2_prefill_runs(packed: PackedWeight, isa: Optional[str] = None) -> bool:
    """Whether the AVX2 prefill walk (:func:`avx2_prefill_linear`) runs ``packed`` on the ``isa`` path
    (default: the selected one): fp32 values in the bitmask or csr16 layout, K <= 65536, the AVX2 or
    AVX-512 path (whose plain kernel takes the same walk from 16 tokens), compiled kernels that have it."""
    lb = native._load()
    return (lb is not None and hasattr(lb, "sr_avx2_prefill_linear") and native.select_isa(isa) in WALK_ISAS
            and packed.values.dtype == torch.float32 and packed.layout in native.LAYOUT_IDS
            and packed.in_features <= 65536)


def avx2_prefill_linear(packed: PackedWeight, bias: Optional[torch.Tensor], x: torch.Tensor,
                        threads: Optional[int] = None, isa: Optional[str] = None, **glue) -> torch.Tensor:
    """``y = f(x) W^T + bias`` (fp32) by the AVX2 prefill walk (csrc/sparse_kernels.cpp,
    ``avx2_blk_linear``: x repacked into 64-token tiles, K walked in L1-sized blocks; what the plain
    sparse kernel runs from 16 tokens on), with the AMX form's ``glue`` (:func:`amx_prefill_linear`:
    ``norm``/``eps``, ``silu_mul``, ``residual``) done in fp32 while x is repacked and y written, so
    the RMSNorm, SiLU-mul and residual add cost no torch ops and no intermediate tensors. The
    numerics are the fp32 path's: the SiLU's exponential is a degree-6 polynomial (relative error
    ~2e-7, like any fp32 expf) and the RMSNorm's sum runs in another order than torch's. ``isa``:
    the path to check against (default: the selected one; "avx2" runs it on an AVX-512 CPU too)."""
    if not avx2_prefill_runs(packed, isa):
        raise ConfigError(f"the AVX2 prefill walk runs fp32 bitmask/csr16 weights on the AVX2 or AVX-512 path, not "
                          f"{packed.layout} with {packed.values.dtype} on {native.select_isa()}; use another form")
    return avx2_prefill_run(packed, bias, x, threads, isa=native.select_isa(isa), **glue)


def avx2_prefill_run(packed: PackedWeight, bias: Optional[torch.Tensor], x: torch.Tensor,
                     threads: Optional[int] = None, isa: str = "avx2", **glue) -> torch.Tensor:
    """:func:`avx2_prefill_linear` without its check that the walk runs ``packed`` here (for callers
    that checked once: the lean engines, per product ~120 times a prefill). ``isa``: the caller's
    path; on "avx512" the walk keeps zmm accumulators (csrc ``avx512_blk_tile``), the same sums."""
    n, k = packed.out_features, packed.in_features
    x2, y, kind, w = _glue_io(n, k, x, glue.get("norm"), bool(glue.get("silu_mul", False)), glue.get("residual"))
    b = None if bias is None else bias.float().contiguous()
    rc = native.lib().sr_avx2_prefill_linear(x2.shape[0], k, n, x2.data_ptr(), native.LAYOUT_IDS[packed.layout],
                                             packed.index.data_ptr(), packed.values.data_ptr(),
                                             packed.row_ptr.data_ptr(), _ptr(b), y.data_ptr(), kind, _ptr(w),
                                             float(glue.get("eps", 0.0)), int(glue.get("residual") is not None),
                                             int(threads or torch.get_num_threads()), native.ISAS.index(isa))
    if rc != 0:
        raise ConfigError(f"AVX2 prefill product failed: {native.ERRORS.get(rc, rc)}")
    return _glue_out(y, x, n, glue.get("residual"))


AVX2_QUANT_MIN_SPARSITY = 0.5  # below, a prompt's dequantize + fp32 GEMM beats the walk (dense work at GEMM speed)


def avx2_quant_runs(qlin, sparsity: float = 1.0) -> bool:
    """Whether the AVX2 prefill walk runs ``qlin`` (a :class:`~sparse_runtime.kernels.quant.QuantLinear`):
    int8 or int4 codes (symmetric or not, per row or per group), dense or bitmask, on the AVX2 or
    AVX-512 path (AVX-512 holds dense codes where the measured decode chose them, e.g. weight-only
    int8 on AMD Zen 4, and bitmask codes where it chose the bitmask code kernel, e.g. W8A8), K <= 65536,
    compiled kernels that have it, and a weight at least AVX2_QUANT_MIN_SPARSITY sparse (the walk's
    work is the nonzeros at about half the GEMM's rate)."""
    lb = native._load()
    p = qlin.packed
    return (lb is not None and hasattr(lb, "sr_avx2_q_prefill_linear") and qlin.isa in WALK_ISAS
            and p.layout in ("dense", "bitmask") and p.bits in (8, 4) and p.in_features <= 65536
            and sparsity >= AVX2_QUANT_MIN_SPARSITY)


def avx2_quant_linear(qlin, x: torch.Tensor, threads: Optional[int] = None, **glue) -> torch.Tensor:
    """``y = f(x) W^T + bias`` for int8 or int4 codes, dense or bitmask, by the AVX2 prefill walk
    (``sr_avx2_q_prefill_linear``, csrc/quant_kernels.inc): each row decoded once per call into its
    nonzero (bitmask: kept) weights, ``scale * (code - zero)`` in fp32 (exact), then walked as
    :func:`avx2_prefill_linear` walks fp32 values, with the same ``glue``. Equal to the fp32 product
    with the dequantized weight to fp32 rounding."""
    n, k = qlin.shape
    x2, y, kind, w = _glue_io(n, k, x, glue.get("norm"), bool(glue.get("silu_mul", False)), glue.get("residual"))
    rc = native.lib().sr_avx2_q_prefill_linear(ctypes.addressof(qlin.desc), x2.shape[0], x2.data_ptr(), y.data_ptr(),
                                               kind, _ptr(w), float(glue.get("eps", 0.0)),
                                               int(glue.get("residual") is not None),
                                               int(threads or torch.get_num_threads()))
    if rc != 0:
        raise ConfigError(f"AVX2 code prefill product failed: {native.ERRORS.get(rc, rc)}")
    return _glue_out(y, x, n, glue.get("residual"))


def amx_runs(packed: PackedWeight) -> bool:
    """Whether the AMX form runs ``packed`` (bitmask layout, fp32 or bf16 values) here."""
    return packed.layout == "bitmask" and packed.values.dtype in VAL_DTYPE_IDS and amx_available()


def amx_prefill_linear(packed: PackedWeight, bias: Optional[torch.Tensor], x: torch.Tensor,
                       threads: Optional[int] = None, **glue) -> torch.Tensor:
    """``y = x W^T + bias`` (fp32) on AMX tiles, the packed weight rebuilt block by block in cache
    (never whole). Equals the fp32 product of ``x.bfloat16()`` and ``W.bfloat16()`` up to fp32
    summation order (denormal bf16 operands count as zero, as AMX treats them).

    ``glue`` fuses prefill's neighbouring ops into the bf16 conversion of x and the write of y (no
    intermediate tensors): ``norm=w, eps=e`` takes the RMSNorm of x as the input (HF Llama's
    ``w * (x * rsqrt(mean(x^2) + e))``, in fp32 before the rounding); ``silu_mul=True`` takes x as a
    gate|up product ``[..., 2K]`` and uses ``silu(gate) * up``; ``residual=r`` adds the product to
    ``r`` in place (a contiguous fp32 tensor of the output's size) and returns it."""
    if not amx_runs(packed):
        raise ConfigError(f"the AMX prefill form runs bitmask weights with float32/bfloat16 values on AMX CPUs, "
                          f"not {packed.layout} with {packed.values.dtype} here; use another form")
    return _fused_bf16_run(packed.out_features, packed.in_features, x, packed.index, packed.values,
                           VAL_DTYPE_IDS[packed.values.dtype], packed.row_ptr, 0, None, None, bias, threads, **glue)


def amx_quant_runs(packed) -> bool:
    """Whether the AMX form runs these quantized codes (int8, bitmask layout) here."""
    return packed.layout == "bitmask" and packed.bits == 8 and amx_available()


def amx_quant_linear(packed, bias: Optional[torch.Tensor], x: torch.Tensor, threads: Optional[int] = None,
                     **glue) -> torch.Tensor:
    """:func:`amx_prefill_linear` for int8 bitmask codes (``kernels.layout.QuantPacked``): each weight
    is ``scale * (code - zero)`` in fp32, rounded to bf16 in registers (no dequantized copy)."""
    if not amx_quant_runs(packed):
        raise ConfigError(f"the AMX prefill form runs int8 bitmask codes on AMX CPUs, not {packed.layout} "
                          f"int{packed.bits} here; use the dequantizing form")
    return _fused_bf16_run(packed.out_features, packed.in_features, x, packed.index, packed.codes, VAL_INT8,
                           packed.row_ptr, packed.group, packed.scales, packed.zeros, bias, threads, **glue)


def bf16_walk_available() -> bool:
    """Whether the bf16 walk runs here: compiled kernels that have it, a CPU with AVX-512 (F/BW/VL/DQ),
    VBMI2 and BF16, and ``SPARSE_RUNTIME_BF16_WALK`` not 0. Offered where AMX is not (AMX's tiles are
    faster: with both, the measured choice decides)."""
    lb = native._load()
    return (os.environ.get(ENV_BF16_WALK, "1") != "0" and lb is not None and hasattr(lb, "sr_bf16_walk_linear")
            and bool(lb.sr_bf16_walk_supported()))


def bf16_walk_runs(packed: PackedWeight) -> bool:
    """Whether the bf16 walk runs ``packed`` here (bitmask layout, fp32 or bf16 values, K <= 65536)."""
    return (packed.layout == "bitmask" and packed.values.dtype in VAL_DTYPE_IDS and packed.in_features <= 65536
            and bf16_walk_available())


def bf16_walk_linear(packed: PackedWeight, bias: Optional[torch.Tensor], x: torch.Tensor,
                     threads: Optional[int] = None, **glue) -> torch.Tensor:
    """``y = f(x) W^T + bias`` (fp32) by the bf16 walk (csrc/bf16_walk.inc): the AVX2 walk's plan with
    bf16 operands, two nonzeros of a row per ``vdpbf16ps``; no dense weight is built. The AMX form's
    numerics (the product of the bf16-rounded operands, fp32 sums and output) and its ``glue``
    (:func:`amx_prefill_linear`). For CPUs with AVX512-BF16 and no AMX."""
    if not bf16_walk_runs(packed):
        raise ConfigError(f"the bf16 prefill walk runs bitmask weights with float32/bfloat16 values on CPUs with "
                          f"AVX512-BF16, not {packed.layout} with {packed.values.dtype} here; use another form")
    return _fused_bf16_run(packed.out_features, packed.in_features, x, packed.index, packed.values,
                           VAL_DTYPE_IDS[packed.values.dtype], packed.row_ptr, 0, None, None, bias, threads, walk=True,
                           **glue)


BF16_WALK_DENSE_MIN_SPARSITY = 0.5  # dense int8 codes: below, the dequantize + bf16 GEMM does less work per weight


def bf16_walk_quant_runs(packed) -> bool:
    """Whether the bf16 walk runs these quantized codes here: int8 or int4, one scale per row or
    groups of a multiple of 32 columns dividing K, in the bitmask layout, or in the dense layout when
    at least ``BF16_WALK_DENSE_MIN_SPARSITY`` of the weights are pruned (the engines hold dense codes
    where the measured decode chose them, e.g. on AMD Zen 4: the walk still reads only the nonzeros)."""
    layout_ok = packed.layout == "bitmask" or (packed.layout == "dense"
                                               and 1.0 - packed.density >= BF16_WALK_DENSE_MIN_SPARSITY)
    return (layout_ok and packed.bits in (8, 4) and packed.in_features <= 65536
            and (packed.group == 0 or (packed.group % 32 == 0 and packed.in_features % packed.group == 0))
            and bf16_walk_available())


def bf16_walk_quant_linear(packed, bias: Optional[torch.Tensor], x: torch.Tensor, threads: Optional[int] = None,
                           **glue) -> torch.Tensor:
    """:func:`bf16_walk_linear` for int8 / int4 codes (bitmask, or dense: ``index`` None tells the
    kernel): each row's nonzero weights ``scale * (code - zero)`` computed in fp32 once per call and
    rounded to bf16 (no dequantized copy of the matrix)."""
    if not bf16_walk_quant_runs(packed):
        raise ConfigError(f"the bf16 prefill walk runs int8 / int4 codes (bitmask, or dense and at least "
                          f"{BF16_WALK_DENSE_MIN_SPARSITY:.0%} zeros) on CPUs with AVX512-BF16, not {packed.layout} "
                          f"int{packed.bits} at density {packed.density:.2f} here; use the dequantizing form")
    vtype = VAL_INT8 if packed.bits == 8 else VAL_INT4
    return _fused_bf16_run(packed.out_features, packed.in_features, x, packed.index, packed.codes, vtype,
                           packed.row_ptr, packed.group, packed.scales, packed.zeros, bias, threads, walk=True, **glue)


def fused_quant_form(packed) -> Optional[str]:
    """The fused bf16 form that runs int8 / int4 codes ``packed`` here: "amx" (int8 bitmask codes on AMX),
    "bf16walk" (AVX512-BF16) or None."""
    return "amx" if amx_quant_runs(packed) else "bf16walk" if bf16_walk_quant_runs(packed) else None


def rope_rows_available() -> bool:
    lb = native._load()
    return lb is not None and hasattr(lb, "sr_rope_rows")


def rope_rows_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The rotary embedding (HF's rotate_half form) in place on the first ``heads`` heads of each row
    of ``x`` ``[B, T, width]`` (contiguous fp32; the fused qkv product, whose q and k heads lead each
    row), ``cos``/``sin`` ``[T, head_dim]``: one C call (csrc/prefill_glue.cpp) instead of ~15 torch
    ops per layer. Returns ``x``."""
    if x.dtype != torch.float32 or not x.is_contiguous() or x.dim() != 3 or x.shape[-1] < heads * head_dim:
        raise ConfigError(f"rope_rows_ needs a contiguous float32 [B, T, >= {heads * head_dim}] tensor, got "
                          f"{x.dtype} {tuple(x.shape)}")
    B, T, width = x.shape
    c, s = cos.float().contiguous(), sin.float().contiguous()
    if tuple(c.shape) != (T, head_dim) or tuple(s.shape) != (T, head_dim):
        raise ConfigError(f"cos/sin must be [{T}, {head_dim}], got {tuple(c.shape)} and {tuple(s.shape)}")
    rc = native.lib().sr_rope_rows(x.data_ptr(), B, T, width, heads, head_dim, c.data_ptr(), s.data_ptr())
    if rc != 0:
        raise ConfigError(f"rotary embedding failed: {native.ERRORS.get(rc, rc)}")
    return x


def prefill_attention_available() -> bool:
    lb = native._load()
    return lb is not None and hasattr(lb, "sr_prefill_attention")


def prefill_attention(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, isa: Optional[str] = None,
                      threads: Optional[int] = None) -> torch.Tensor:
    """Causal grouped-query attention of a prompt that starts its sequence, straight from the fused
    qkv product ``[B, T, (heads + 2 kv_heads) * head_dim]`` (contiguous fp32, q and k already
    rotated): ``[B, T, heads * head_dim]``, the layout the o projection reads. One C call
    (csrc/prefill_attention.cpp) in place of torch's SDPA and the transposes around it; fp32, equal
    to ``F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)`` to fp32 rounding.
    ``isa``: ``"avx2"`` (default where the CPU has it and ``head_dim`` is a multiple of 16) or
    ``"portable"``."""
    if qkv.dtype != torch.float32 or not qkv.is_contiguous() or qkv.dim() != 3:
        raise ConfigError(f"prefill_attention needs a contiguous float32 [B, T, width] tensor, got {qkv.dtype} "
                          f"{tuple(qkv.shape)}")
    B, T, width = qkv.shape
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads or width != (heads + 2 * kv_heads) * head_dim:
        raise ConfigError(f"qkv width {width} does not hold {heads} query and 2 x {kv_heads} kv heads of "
                          f"{head_dim} (query heads must be a multiple of kv heads)")
    if isa is None:
        isa = "avx2" if "avx2" in native.supported_isas() and head_dim % 16 == 0 else "portable"
    if isa not in ("avx2", "portable"):
        raise ConfigError(f"prefill_attention runs on 'avx2' or 'portable', not {isa!r}")
    out = torch.empty(B, T, heads * head_dim, dtype=torch.float32)
    q = qkv.data_ptr()
    k = q + heads * head_dim * 4
    v = k + kv_heads * head_dim * 4
    rc = native.lib().sr_prefill_attention(q, T * width, width, k, v, T * width, width, out.data_ptr(),
                                           T * heads * head_dim, heads * head_dim, B, T, heads, kv_heads, head_dim,
                                           float(head_dim ** -0.5), native.ISAS.index(isa),
                                           int(threads or torch.get_num_threads()))
    if rc != 0:
        raise ConfigError(f"prefill attention failed: {native.ERRORS.get(rc, rc)}")
    return out


def fpmath_available() -> bool:
    """Whether torch exposes oneDNN's bf16 math mode for fp32 matmuls (torch >= 2.9)."""
    return hasattr(getattr(getattr(torch.backends, "mkldnn", None), "matmul", None), "fp32_precision")


@contextmanager
def bf16_fpmath():
    """fp32 ``F.linear`` calls inside run oneDNN's bf16 math mode: fp32 in and out, both operands
    rounded to bf16 inside oneDNN (AMX where present), fp32 accumulation, NO bf16 rounding of the
    output. For dense fp32 weights (the lean-cpu variant, the tied lm_head) this needs neither a
    bf16 copy of the weight (memory) nor a per-call ``w.to(torch.bfloat16)`` (which cost ~70 % of
    the bf16 GEMM on the SmolLM2 shapes). Process-wide while active (torch's flag), restored after."""
    if not fpmath_available():
        raise ConfigError(f"torch {torch.__version__} has no torch.backends.mkldnn.matmul.fp32_precision "
                          "(torch >= 2.9); use dense_bf16_linear, which converts per call")
    m = torch.backends.mkldnn.matmul
    old = m.fp32_precision
    m.fp32_precision = "bf16"
    try:
        yield
    finally:
        m.fp32_precision = old


def dense_bf16_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 ``x W^T + bias`` of a DENSE weight computed in bf16 (fp32 out): a bf16 weight runs the
    bf16 GEMM like :func:`bf16_prefill_linear`; an fp32 weight runs in :func:`bf16_fpmath` (no copy),
    or converted per call on a torch without it."""
    if w.dtype == torch.bfloat16:
        y = F.linear(x.to(torch.bfloat16), w)
        return y.float() if bias is None else torch.add(y, bias.float())
    if fpmath_available():
        with bf16_fpmath():
            return F.linear(x.float(), w, bias)
    return dense_bf16_linear(x, w.to(torch.bfloat16), bias)


def token_bucket(tokens: int) -> int:
    """The token count a measurement is made at: the next power of two (64 for 33..64, 128 for 65..128)."""
    return 1 << max(0, int(tokens) - 1).bit_length()


@contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


def _form_key(packed: PackedWeight, isa: str, bucket: int, threads: int, forms: tuple[str, ...]) -> tuple:
    return (isa, packed.layout, str(packed.values.dtype), packed.out_features, packed.in_features,
            round(packed.density * 20) / 20, threads, bucket, forms)


@torch.inference_mode()
def choose_prefill_form(packed: PackedWeight, tokens: int, threads: int, forms: Iterable[str] = PREFILL_FORMS, *,
                        bias: Optional[torch.Tensor] = None, scratch=None, isa: Optional[str] = None,
                        repeats: int = 5) -> str:
    """The fastest of ``forms`` for ``packed`` at ``tokens`` rows on ``threads`` threads, measured:
    ``sparse`` (the packed kernel), ``float32`` (fp32 rebuild + fp32 GEMM, what the dispatch's dense
    path does), ``bfloat16`` (:func:`bf16_prefill_linear`), ``amx`` (:func:`amx_prefill_linear`), ``bf16walk``
    (:func:`bf16_walk_linear`). All timed alternately, one call each per
    round, ``repeats`` rounds, medians compared, at the token bucket (:func:`token_bucket`), on fp32
    activations. Cached per (ISA, layout, value dtype, shape, density to 0.05, threads, bucket,
    forms); :func:`prefill_form_timings` gives the medians behind a choice. Pass only the forms the
    caller allows (``bfloat16``, ``amx`` and ``bf16walk`` change the numerics: opt-in)."""
    isa = native.select_isa(isa)
    forms = _runnable_forms(packed, isa, forms)
    if len(forms) == 1:
        return forms[0]
    key = _form_key(packed, isa, token_bucket(tokens), int(threads), forms)
    if key not in _FORM_CACHE:
        _FORM_CACHE[key] = _measure_forms(packed, token_bucket(tokens), int(threads), forms, bias, scratch, isa,
                                          repeats)
    return _FORM_CACHE[key][0]


def prefill_form_timings(packed: PackedWeight, tokens: int, threads: int, forms: Iterable[str] = PREFILL_FORMS,
                         isa: Optional[str] = None) -> dict[str, float]:
    """The medians (ms) behind :func:`choose_prefill_form`'s cached choice (empty if not measured)."""
    isa = native.select_isa(isa)
    key = _form_key(packed, isa, token_bucket(tokens), int(threads), _runnable_forms(packed, isa, forms))
    return dict(_FORM_CACHE[key][1]) if key in _FORM_CACHE else {}


def _runnable_forms(packed: PackedWeight, isa: str, forms: Iterable[str]) -> tuple[str, ...]:
    """``forms`` (deduplicated, order kept) less those that cannot run here."""
    forms = tuple(dict.fromkeys(forms))
    bad = [f for f in forms if f not in PREFILL_FORMS]
    if bad or not forms:
        raise ConfigError(f"unknown prefill form(s) {bad or list(forms)}; choose from {', '.join(PREFILL_FORMS)}")
    ok = tuple(f for f in forms if (f != "sparse" or _sparse_runs(packed, isa))
               and (f != "bfloat16" or densify_bf16_available()) and (f != "amx" or amx_runs(packed))
               and (f != "bf16walk" or bf16_walk_runs(packed)))
    if not ok:
        raise ConfigError(f"none of the prefill forms {list(forms)} runs {packed.layout} with "
                          f"{packed.values.dtype} values on {isa}; allow 'float32'")
    return ok


def _sparse_runs(packed: PackedWeight, isa: str) -> bool:
    if packed.values.dtype == torch.bfloat16:
        return native.supports_bf16(isa, packed.layout)
    return (packed.layout, isa) in native.IMPLEMENTED


def prefill_call(form: str, packed: PackedWeight, bias: Optional[torch.Tensor], x: torch.Tensor, scratch,
                 isa: Optional[str] = None, threads: Optional[int] = None) -> torch.Tensor:
    """One product in ``form`` (fp32 output): what :func:`choose_prefill_form` times."""
    from .module import densify_into
    from .ops import _ISA_ID, _run

    if form == "sparse":
        name = native.select_isa(isa)
        return _run(x, packed.index, packed.values, packed.row_ptr, bias, packed.out_features, packed.in_features,
                    native.LAYOUT_IDS[packed.layout], _ISA_ID[name])
    if form == "float32":
        w = densify_into(packed, scratch.get(packed.out_features, packed.in_features, torch.float32), threads)
        return F.linear(x.float(), w, None if bias is None else bias.float())
    if form == "amx":
        return amx_prefill_linear(packed, bias, x, threads)
    if form == "bf16walk":
        return bf16_walk_linear(packed, bias, x, threads)
    return bf16_prefill_linear(packed, bias, x, scratch, threads, isa)


def _measure_forms(packed, bucket, threads, forms, bias, scratch, isa, repeats) -> tuple[str, dict[str, float]]:
    from .module import DenseScratch

    scratch = scratch if scratch is not None else DenseScratch()
    x = torch.randn(bucket, packed.in_features, generator=torch.Generator().manual_seed(0))
    calls = {f: (lambda f=f: prefill_call(f, packed, bias, x, scratch, isa, threads)) for f in forms}
    times: dict[str, list[float]] = {f: [] for f in forms}
    with _torch_threads(threads):
        for fn in calls.values():  # warm-up (oneDNN builds its primitive on the first call of a shape)
            fn()
            fn()
        for _ in range(repeats):
            for f, fn in calls.items():
                t = time.perf_counter()
                fn()
                times[f].append(time.perf_counter() - t)
    med = {f: statistics.median(t) * 1e3 for f, t in times.items()}
    return min(med, key=med.get), med
