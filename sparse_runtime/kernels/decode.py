"""ctypes view of the compiled lean decode steps (``sr_decode_step`` and the batched
``sr_decode_step_batch`` in ``csrc/lean_decode.inc``, declared in ``csrc/sparse_runtime.h``).

The C step runs one whole batch-1 decode token of a Llama-family decoder in one OpenMP region; this
module only describes the model to it: :class:`CLinear` (one dense or packed sparse linear),
:class:`CLayer` and :class:`CModel` mirror the C structs ``SRLinear``, ``SRLayer`` and ``SRModel``
field for field (checked against the library's own sizes and offsets when it loads:
:data:`STRUCTS`, :func:`sparse_runtime.kernels.native.check_structs`), and :func:`linear_desc`
builds a descriptor from the tensors a caller keeps alive. The model logic (which weights, fused
how, the KV cache, prefill) lives in :mod:`sparse_runtime.runtime.lean_llama`.
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator, Optional

import torch

from ..errors import ConfigError
from . import native
from .layout import PackedWeight

KIND_DENSE, KIND_BITMASK, KIND_CSR16 = 0, 1, 2
STEP_BF16 = 1  # sr_decode_step_batch's flag SR_STEP_BF16
STAGES = ("norms", "qkv", "rope+cache", "attention", "o_proj", "gate_up", "silu*mul", "down", "lm_head")  # C order
_KINDS = {"bitmask": KIND_BITMASK, "csr16": KIND_CSR16}
_i32, _i64, _p, _f = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


VT_F32, VT_INT8, VT_INT4 = 0, 1, 2  # SRLinear.vtype
# SRLinear.act: fp32 activations, or int8 (W8A8) with one scale per token or per 64 / 128 columns of it
ACT_CODES = {"float32": 0, "int8": 1, "int8-g64": 64, "int8-g128": 128}
ACT_DTYPES = tuple(ACT_CODES)


class CLinear(ctypes.Structure):
    _fields_ = [("kind", _i32), ("isa", _i32), ("N", _i64), ("K", _i64), ("index", _p), ("values", _p),
                ("row_ptr", _p), ("bias", _p), ("vtype", _i32), ("act", _i32), ("group", _i64), ("scales", _p),
                ("zeros", _p)]


class CLayer(ctypes.Structure):
    _fields_ = [("in_norm", _p), ("post_norm", _p), ("qkv", CLinear), ("o", CLinear), ("gate_up", CLinear),
                ("down", CLinear), ("k_cache", _p), ("v_cache", _p), ("window", _i64)]


class CModel(ctypes.Structure):
    _fields_ = [("n_layers", _i64), ("hidden", _i64), ("inter", _i64), ("n_heads", _i64), ("n_kv_heads", _i64),
                ("head_dim", _i64), ("vocab", _i64), ("cap", _i64), ("eps", _f), ("kv_f16", _i32), ("embed", _p),
                ("final_norm", _p), ("lm_head", CLinear), ("layers", _p), ("scratch", _p)]


# The C name of each mirror: the library's sr_struct_size/sr_field_offset are compared with these.
STRUCTS: dict[str, type[ctypes.Structure]] = {"SRLinear": CLinear, "SRLayer": CLayer, "SRModel": CModel}


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def linear_desc(isa: str, *, dense: Optional[torch.Tensor] = None, packed: Optional[PackedWeight] = None,
                bias: Optional[torch.Tensor] = None, quant=None, act: str = "float32") -> CLinear:
    """A C descriptor for ``y = W x + b``: ``dense`` (a contiguous fp32 [N, K] weight), ``packed``
    (fp32 values; the layout must have a kernel on ``isa``) or ``quant`` (a
    :class:`~sparse_runtime.kernels.layout.QuantPacked`: int8/int4 codes, dense or bitmask; ``isa``
    is the path requested, the C side runs the best quantized path it has there, see
    ``native.quant_isa``). ``act="int8"`` / ``"int8-g64"`` / ``"int8-g128"`` (int8 codes only): the
    products quantize x to int8 with one scale per token / per 64 or 128 columns of it and multiply
    in integers (W8A8, csrc/w8a8.inc). The caller keeps the tensors alive."""
    isa_id = native.ISAS.index(isa)
    if act not in ACT_DTYPES:
        raise ConfigError(f"act {act!r}: choose {' or '.join(ACT_DTYPES)}")
    if act != "float32":
        from .reference import w8a8_eligible

        why = "int8 activations need quantized int8 values (--dtype int8)" if quant is None else \
            w8a8_eligible(quant, act)
        if why:
            raise ConfigError(why)
    if quant is not None:
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            raise ConfigError(f"the lean decode step takes a contiguous float32 bias; got {bias.dtype}")
        q = quant
        kind, qisa = KIND_BITMASK if q.layout == "bitmask" else KIND_DENSE, native.quant_isa(isa, q.layout)
        return CLinear(kind, native.ISAS.index(qisa), q.out_features, q.in_features, _ptr(q.index),
                       q.codes.data_ptr(), _ptr(q.row_ptr), _ptr(bias),
                       VT_INT8 if q.bits == 8 else VT_INT4, ACT_CODES[act], q.group, q.scales.data_ptr(),
                       _ptr(q.zeros))
    for name, t in (("dense weight", dense), ("bias", bias)):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            raise ConfigError(f"the lean decode step takes contiguous float32 tensors; got a {t.dtype} {name}")
    if packed is not None:
        if packed.values.dtype != torch.float32:
            raise ConfigError("the lean decode step runs float32 values only; pack with value_dtype='float32'")
        if (packed.layout, isa) not in native.IMPLEMENTED:
            raise ConfigError(f"no {isa} kernel for the {packed.layout} layout")
        return CLinear(_KINDS[packed.layout], isa_id, packed.out_features, packed.in_features,
                       packed.index.data_ptr(), packed.values.data_ptr(), packed.row_ptr.data_ptr(), _ptr(bias))
    if dense is None:
        raise ConfigError("linear_desc needs a dense weight or a packed one")
    return CLinear(KIND_DENSE, isa_id, dense.shape[0], dense.shape[1], None, dense.data_ptr(), None, _ptr(bias))


def _bind() -> ctypes.CDLL:
    lb = native.lib()
    if not hasattr(lb, "sr_decode_step"):
        raise ConfigError("the compiled kernels predate the lean decode step; rebuild them with `pip install -e .`")
    if not getattr(lb.sr_decode_step, "argtypes", None):  # set once per library
        lb.sr_decode_step.argtypes = [ctypes.POINTER(CModel), _i64, _i64, _p, _p, _p, ctypes.c_int]
        lb.sr_decode_step.restype = ctypes.c_int
        lb.sr_decode_scratch_floats.argtypes = [ctypes.POINTER(CModel)]
        lb.sr_decode_scratch_floats.restype = _i64
        lb.sr_kv_f16_store.argtypes = [_p, _p, _i64, ctypes.c_int]
        lb.sr_kv_f16_store.restype = ctypes.c_int
        lb.sr_linear_desc_run.argtypes = [ctypes.POINTER(CLinear), _p, _p, ctypes.c_int]
        lb.sr_linear_desc_run.restype = ctypes.c_int
        lb.sr_decode_profile.argtypes = [ctypes.c_int]
        lb.sr_decode_profile.restype = None
        lb.sr_decode_profile_get.argtypes = [_p]
        lb.sr_decode_profile_get.restype = None
        lb.sr_attn_form.argtypes = [ctypes.c_int]
        lb.sr_attn_form.restype = ctypes.c_int
        lb.sr_thread_pace.argtypes = [ctypes.c_int, _i64, _p]
        lb.sr_thread_pace.restype = ctypes.c_int
        lb.sr_a8_bytes_only.argtypes = [ctypes.c_int]
        lb.sr_a8_bytes_only.restype = ctypes.c_int
        if hasattr(lb, "sr_linear_desc_run_batch"):
            lb.sr_linear_desc_run_batch.argtypes = [ctypes.POINTER(CLinear), _p, _i64, _p, ctypes.c_int]
            lb.sr_linear_desc_run_batch.restype = ctypes.c_int
            lb.sr_linear_desc_densify_rows.argtypes = [ctypes.POINTER(CLinear), _p, _i64, _p, ctypes.c_int]
            lb.sr_linear_desc_densify_rows.restype = ctypes.c_int
        if hasattr(lb, "sr_decode_step_batch"):
            lb.sr_decode_step_batch.argtypes = [ctypes.POINTER(CModel), _i64, _p, _p, _p, _p, _p, _i64, _p, _p, _p,
                                                ctypes.c_int, ctypes.c_int]
            lb.sr_decode_step_batch.restype = ctypes.c_int
    return lb


def available() -> bool:
    """Whether the loaded kernel library has the lean decode step."""
    return native.available() and hasattr(native.lib(), "sr_decode_step")


def batch_available() -> bool:
    """Whether the loaded kernel library has the batched step (``sr_decode_step_batch``)."""
    return available() and hasattr(native.lib(), "sr_decode_step_batch")


def scratch_floats(model: CModel) -> int:
    return int(_bind().sr_decode_scratch_floats(ctypes.byref(model)))


def run_linear(desc: CLinear, x: torch.Tensor, y: torch.Tensor, threads: int) -> None:
    """``y = W x + b`` for one descriptor (batch 1, contiguous fp32 ``x`` [K] and ``y`` [N]) through
    the step's own kernels and thread split: what the lean path times to choose dense or packed."""
    rc = _bind().sr_linear_desc_run(ctypes.byref(desc), x.data_ptr(), y.data_ptr(), threads)
    if rc != 0:
        raise ConfigError(f"sr_linear_desc_run failed: {native.ERRORS.get(rc, rc)}")


def run_linear_batch(desc: CLinear, x: torch.Tensor, y: torch.Tensor, threads: int) -> None:
    """``y [B, N] = x [B, K] W^T + b`` for one descriptor at any batch (contiguous fp32): the
    standalone entry of the quantized kernels (batch 1 as in the step; B > 1 decodes each weight
    row once for all B rows)."""
    rc = _bind().sr_linear_desc_run_batch(ctypes.byref(desc), x.data_ptr(), int(x.shape[0]), y.data_ptr(), threads)
    if rc != 0:
        raise ConfigError(f"sr_linear_desc_run_batch failed: {native.ERRORS.get(rc, rc)} (a quantized group must be "
                          f"32, 64 or 128 columns and divide the input width)")


def densify_rows(desc: CLinear, out: torch.Tensor, rows: Optional[torch.Tensor] = None,
                 threads: int = 1) -> torch.Tensor:
    """The listed rows (int64; all when None) of a quantized descriptor dequantized into ``out``
    ``[n, K]`` fp32 (exactly ``scale * (code - zero)``, zeros where pruned)."""
    n = desc.N if rows is None else int(rows.numel())
    rc = _bind().sr_linear_desc_densify_rows(ctypes.byref(desc), _ptr(rows), n, out.data_ptr(), threads)
    if rc != 0:
        raise ConfigError(f"sr_linear_desc_densify_rows failed: {native.ERRORS.get(rc, rc)}")
    return out


def kv_f16_store(x: torch.Tensor, isa: str) -> torch.Tensor:
    """``x`` (fp32) rounded to fp16 as the decode steps store an fp16 K/V cache (``LeanConfig.kv_dtype``)
    on ``isa``: the bits of each value, as int16 (compare with ``x.half().view(torch.int16)``)."""
    from . import native

    x = x.contiguous().float()
    out = torch.empty(x.shape, dtype=torch.int16)
    rc = _bind().sr_kv_f16_store(x.data_ptr(), out.data_ptr(), x.numel(), native.ISAS.index(isa))
    if rc != 0:
        raise ConfigError(f"sr_kv_f16_store failed: {native.ERRORS.get(rc, rc)}")
    return out


def profile_start() -> None:
    """Zero and start the per-stage timers of the C step (thread 0, between barriers)."""
    _bind().sr_decode_profile(1)


def profile_stop() -> dict[str, float]:
    """Stop the stage timers; seconds accumulated per stage since :func:`profile_start`."""
    lb = _bind()
    buf = (ctypes.c_double * len(STAGES))()
    lb.sr_decode_profile_get(buf)
    lb.sr_decode_profile(0)
    return {name: float(buf[i]) for i, name in enumerate(STAGES)}


ATTN_FORMS = ("shares", "ranges")  # sr_attn_form's 0 and 1


def attn_form(form: Optional[str] = None) -> str:
    """The batch-1 step's attention form, process-wide; returns the form before the call and sets
    ``form`` when given. ``shares`` (the default): the (kv head, position) pairs cut into one equal,
    contiguous share per thread, only the heads a share boundary falls inside merged; ``ranges``:
    every kv head cut into one range per thread, every head merged (the flash-decoding split). Both
    give the same result to fp32 rounding; a tuning and benchmarking hook (docs/kernels.md "Decode
    attention", "Equal shares")."""
    if form is not None and form not in ATTN_FORMS:
        raise ValueError(f"attention form {form!r}: choose {' or '.join(ATTN_FORMS)}")
    old = int(_bind().sr_attn_form(ATTN_FORMS.index(form) if form is not None else -1))
    return ATTN_FORMS[old]


def thread_pace(threads: int, iters: int = 100_000) -> list[float]:
    """Microseconds each of ``threads`` OpenMP threads takes, started together, for the same dependent
    chain of ``iters`` multiply-adds (``sr_thread_pace``); -1 for a thread the runtime did not start.
    Equal on a machine whose cores run at one pace; on a VM a vCPU time-shared with another guest reads
    about twice the others for as long as that lasts, and every timing then moves with it.
    ``benchmarks/bench_decode_context.py`` records it per round (docs/protocols.md "Machine pace")."""
    if threads < 1 or iters < 1:
        raise ValueError(f"thread_pace({threads}, {iters}): give at least one thread and one iteration")
    out = (ctypes.c_double * threads)()
    rc = _bind().sr_thread_pace(threads, iters, out)
    if rc != 0:
        raise ConfigError(f"sr_thread_pace failed: {native.ERRORS.get(rc, rc)}")
    return list(out)


@contextlib.contextmanager
def bytes_only() -> Iterator[None]:
    """Inside the block, every batch-1 W8A8 product with one scale per token (AVX-512, dense or
    bitmask codes) quantizes its input, then only reads its weight bytes (flat, a line at a time) and
    writes zeros: **wrong results by design**, process-wide, restored on exit. What it is for: timing a
    decode token whose products take only as long as their bytes take to arrive, the floor any kernel
    for the format meets on this machine (``benchmarks/bench_decode_context.py --bytes-only``;
    docs/kernels.md "The format's floor inside the token"). A context manager only, so it cannot be
    left on."""
    lb = _bind()
    old = int(lb.sr_a8_bytes_only(1))
    try:
        yield
    finally:
        lb.sr_a8_bytes_only(old)


class DecodeStep:
    """A bound ``sr_decode_step`` for one :class:`CModel` (argument types set once; call per token)."""

    def __init__(self, model: CModel):
        self._fn = _bind().sr_decode_step
        self._model = ctypes.byref(model)
        self.model = model

    def __call__(self, token: int, pos: int, cos_ptr: int, sin_ptr: int, logits_ptr: int, threads: int) -> None:
        rc = self._fn(self._model, token, pos, cos_ptr, sin_ptr, logits_ptr, threads)
        if rc != 0:
            raise ConfigError(f"sr_decode_step failed: {native.ERRORS.get(rc, rc)} (token {token}, position {pos}, "
                              f"cache capacity {self.model.cap})")


class DecodeStepBatch:
    """A bound ``sr_decode_step_batch``: one decode token for each of B slots of a serving cache
    ``[layers, n_slots, kv_heads, capacity, head_dim]`` (fp32, or fp16 with ``model.kv_f16``) in ONE C call,
    every linear's weights read once
    for all B rows (the point: decode is bound by weight bytes). ``model`` describes the weights
    (its layers' own cache pointers are unused); the caller keeps the caches and tables alive."""

    def __init__(self, model: CModel, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, bf16: bool = False):
        kv = torch.float16 if model.kv_f16 else torch.float32  # the caches' element type (CModel.kv_f16)
        for name, t, want in (("k cache", k_cache, kv), ("v cache", v_cache, kv), ("cos table", cos, torch.float32),
                              ("sin table", sin, torch.float32)):
            if t.dtype != want or not t.is_contiguous():
                raise ConfigError(f"the batched decode step takes a contiguous {want} {name}; got a {t.dtype} one")
        self._fn = _bind().sr_decode_step_batch
        self._model = ctypes.byref(model)
        self.model = model
        self._k, self._v, self._cos, self._sin = k_cache, v_cache, cos, sin
        self.n_slots = int(k_cache.shape[1])
        # SR_STEP_BF16: packed bitmask linears on AMX tiles (bf16 operands) from 4 rows (kAmxStepMinBatch)
        self.flags = STEP_BF16 if bf16 else 0

    def __call__(self, tokens: list[int], slots: list[int], pos: list[int], logits: torch.Tensor,
                 threads: int) -> None:
        """Logits ``[B, vocab]`` (contiguous fp32, written in place) for ``tokens[b]`` at position
        ``pos[b]`` of slot ``slots[b]`` (distinct slots); each K/V lands in its slot's rows."""
        B = len(slots)
        arr = _i64 * B
        rc = self._fn(self._model, B, arr(*tokens), arr(*slots), arr(*pos), self._k.data_ptr(), self._v.data_ptr(),
                      self.n_slots, self._cos.data_ptr(), self._sin.data_ptr(), logits.data_ptr(), threads,
                      self.flags)
        if rc != 0:
            raise ConfigError(f"sr_decode_step_batch failed: {native.ERRORS.get(rc, rc)} (slots {list(slots)}, "
                              f"positions {list(pos)}, tokens {list(tokens)}, capacity {self.model.cap}; slots must "
                              f"be distinct)")
