"""ctypes view of the compiled lean decode step (``sr_decode_step`` in ``csrc/lean_decode.inc``).

The C step runs one whole batch-1 decode token of a Llama-family decoder in one OpenMP region; this
module only describes the model to it: :class:`CLinear` (one dense or packed sparse linear),
:class:`CLayer` and :class:`CModel` mirror the C structs field for field, and :func:`linear_desc`
builds a descriptor from the tensors a caller keeps alive. The model logic (which weights, fused
how, the KV cache, prefill) lives in :mod:`sparse_runtime.runtime.lean_llama`.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from ..errors import ConfigError
from . import _lib
from .layout import PackedWeight

KIND_DENSE, KIND_BITMASK, KIND_CSR16 = 0, 1, 2
STAGES = ("norms", "qkv", "rope+cache", "attention", "o_proj", "gate_up", "silu*mul", "down", "lm_head")  # C order
_KINDS = {"bitmask": KIND_BITMASK, "csr16": KIND_CSR16}
_i32, _i64, _p, _f = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class CLinear(ctypes.Structure):
    _fields_ = [("kind", _i32), ("isa", _i32), ("N", _i64), ("K", _i64), ("index", _p), ("values", _p),
                ("row_ptr", _p), ("bias", _p)]


class CLayer(ctypes.Structure):
    _fields_ = [("in_norm", _p), ("post_norm", _p), ("qkv", CLinear), ("o", CLinear), ("gate_up", CLinear),
                ("down", CLinear), ("k_cache", _p), ("v_cache", _p), ("window", _i64)]


class CModel(ctypes.Structure):
    _fields_ = [("n_layers", _i64), ("hidden", _i64), ("inter", _i64), ("n_heads", _i64), ("n_kv_heads", _i64),
                ("head_dim", _i64), ("vocab", _i64), ("cap", _i64), ("eps", _f), ("pad_", _i32), ("embed", _p),
                ("final_norm", _p), ("lm_head", CLinear), ("layers", _p), ("scratch", _p)]


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def linear_desc(isa: str, *, dense: Optional[torch.Tensor] = None, packed: Optional[PackedWeight] = None,
                bias: Optional[torch.Tensor] = None) -> CLinear:
    """A C descriptor for ``y = W x + b``: ``dense`` (a contiguous fp32 [N, K] weight) or ``packed``
    (fp32 values; the layout must have a kernel on ``isa``). The caller keeps the tensors alive."""
    isa_id = _lib.ISAS.index(isa)
    for name, t in (("dense weight", dense), ("bias", bias)):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            raise ConfigError(f"the lean decode step takes contiguous float32 tensors; got a {t.dtype} {name}")
    if packed is not None:
        if packed.values.dtype != torch.float32:
            raise ConfigError("the lean decode step runs float32 values only; pack with value_dtype='float32'")
        if (packed.layout, isa) not in _lib.IMPLEMENTED:
            raise ConfigError(f"no {isa} kernel for the {packed.layout} layout")
        return CLinear(_KINDS[packed.layout], isa_id, packed.out_features, packed.in_features,
                       packed.index.data_ptr(), packed.values.data_ptr(), packed.row_ptr.data_ptr(), _ptr(bias))
    if dense is None:
        raise ConfigError("linear_desc needs a dense weight or a packed one")
    return CLinear(KIND_DENSE, isa_id, dense.shape[0], dense.shape[1], None, dense.data_ptr(), None, _ptr(bias))


def _bind() -> ctypes.CDLL:
    lb = _lib.lib()
    if not hasattr(lb, "sr_decode_step"):
        raise ConfigError("the compiled kernels predate the lean decode step; rebuild them with `pip install -e .`")
    if not getattr(lb.sr_decode_step, "argtypes", None):  # set once per library
        lb.sr_decode_step.argtypes = [ctypes.POINTER(CModel), _i64, _i64, _p, _p, _p, ctypes.c_int]
        lb.sr_decode_step.restype = ctypes.c_int
        lb.sr_decode_scratch_floats.argtypes = [ctypes.POINTER(CModel)]
        lb.sr_decode_scratch_floats.restype = _i64
        lb.sr_linear_desc_run.argtypes = [ctypes.POINTER(CLinear), _p, _p, ctypes.c_int]
        lb.sr_linear_desc_run.restype = ctypes.c_int
        lb.sr_decode_profile.argtypes = [ctypes.c_int]
        lb.sr_decode_profile.restype = None
        lb.sr_decode_profile_get.argtypes = [_p]
        lb.sr_decode_profile_get.restype = None
    return lb


def available() -> bool:
    """Whether the loaded kernel library has the lean decode step."""
    return _lib.available() and hasattr(_lib.lib(), "sr_decode_step")


def scratch_floats(model: CModel) -> int:
    return int(_bind().sr_decode_scratch_floats(ctypes.byref(model)))


def run_linear(desc: CLinear, x: torch.Tensor, y: torch.Tensor, threads: int) -> None:
    """``y = W x + b`` for one descriptor (batch 1, contiguous fp32 ``x`` [K] and ``y`` [N]) through
    the step's own kernels and thread split: what the lean path times to choose dense or packed."""
    rc = _bind().sr_linear_desc_run(ctypes.byref(desc), x.data_ptr(), y.data_ptr(), threads)
    if rc != 0:
        raise ConfigError(f"sr_linear_desc_run failed: {_lib.ERRORS.get(rc, rc)}")


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


class DecodeStep:
    """A bound ``sr_decode_step`` for one :class:`CModel` (argument types set once; call per token)."""

    def __init__(self, model: CModel):
        self._fn = _bind().sr_decode_step
        self._model = ctypes.byref(model)
        self.model = model

    def __call__(self, token: int, pos: int, cos_ptr: int, sin_ptr: int, logits_ptr: int, threads: int) -> None:
        rc = self._fn(self._model, token, pos, cos_ptr, sin_ptr, logits_ptr, threads)
        if rc != 0:
            raise ConfigError(f"sr_decode_step failed: {_lib.ERRORS.get(rc, rc)} (token {token}, position {pos}, "
                              f"cache capacity {self.model.cap})")
