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

Which form a product takes is measured (:func:`choose_prefill_form`): the sparse kernel, the fp32
rebuild + fp32 GEMM and the bf16 rebuild + bf16 GEMM, timed alternately at the token bucket, per
(ISA, layout, value dtype, shape, density, threads, bucket), cached for the process like
``module.measure_dispatch``.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import native
from .layout import PackedWeight

PREFILL_FORMS = ("sparse", "float32", "bfloat16")
VAL_DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1}  # SR_VAL_F32 / SR_VAL_BF16
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
    path does), ``bfloat16`` (:func:`bf16_prefill_linear`). All timed alternately, one call each per
    round, ``repeats`` rounds, medians compared, at the token bucket (:func:`token_bucket`), on fp32
    activations. Cached per (ISA, layout, value dtype, shape, density to 0.05, threads, bucket,
    forms); :func:`prefill_form_timings` gives the medians behind a choice. Pass only the forms the
    caller allows (``bfloat16`` changes the numerics: opt-in)."""
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
               and (f != "bfloat16" or densify_bf16_available()))
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
