"""The compiled kernels' public Python face: loading the library (ctypes over the C entry points
declared in ``csrc/sparse_runtime.h``), CPU features, choosing a path, call counters.

The extension is an ordinary setuptools extension module built at install time; it exports plain C
functions, which ctypes calls with the GIL released. If it is missing (build failed, or an
unsupported platform) everything here still imports: :func:`available` says False and
:func:`unavailable_reason` says why. The same holds for a library built from other sources than
this package (an old build after a ``git pull``): at load, the sizes and field offsets of the C
structs are compared with their ctypes mirrors (:func:`check_structs`), and a mismatch makes the
library unavailable with one line naming the fix, instead of a decode step reading garbage.

Path choice, once per process (or per call with ``isa=``): ``SPARSE_RUNTIME_KERNEL_ISA`` =
``avx512`` | ``avx2`` | ``portable`` forces one (an error if the CPU lacks it); otherwise the best
the CPU supports. Each ISA has its own default layout (AVX-512: bitmask + expand-load; AVX2:
csr16, x read by gathers or by scalar loads + inserts, measured per process; portable: bitmask);
``SPARSE_RUNTIME_KERNEL_LAYOUT`` overrides the layout where the pair is implemented (AVX2 also
runs bitmask, by a left-pack of x: slower than csr16 there, but no repacking).
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from typing import Mapping, Optional

from ..errors import ConfigError

ISAS = ("portable", "avx2", "avx512")  # index = the C enum
LAYOUT_IDS = {"bitmask": 0, "csr16": 1}
DEFAULT_LAYOUT = {"avx512": "bitmask", "avx2": "csr16", "portable": "bitmask"}
IMPLEMENTED = {("bitmask", "avx512"), ("bitmask", "avx2"), ("bitmask", "portable"), ("csr16", "avx2"),
               ("csr16", "portable")}
IMPLEMENTED_BF16 = IMPLEMENTED - {("bitmask", "avx2")}  # bf16 values: AVX2 runs them in csr16 only
ENV_ISA = "SPARSE_RUNTIME_KERNEL_ISA"
ENV_LAYOUT = "SPARSE_RUNTIME_KERNEL_LAYOUT"
ENV_LIB = "SPARSE_RUNTIME_KERNEL_LIB"
ENV_GEMV = "SPARSE_RUNTIME_AVX512_GEMV"  # register | memory | auto (default): the AVX-512 batch-1 form
GEMV_VARIANTS = {"memory": 0, "register": 1}  # the C kernel's sr_set_gemv_variant ids
# Batch-1 kernel forms per ISA path (same arithmetic, different instructions), the C ids of
# sr_set_gemv_form, and the variable that forces one (else measured: module.choose_gemv_variant).
GEMV_FORMS = {"avx512": GEMV_VARIANTS, "avx2": {"gather": 0, "insert": 1}}
GEMV_FORM_LAYOUT = {"avx512": "bitmask", "avx2": "csr16"}  # the layout whose batch-1 kernel has the forms
ENV_GEMV_FORM = {"avx512": ENV_GEMV, "avx2": "SPARSE_RUNTIME_AVX2_GEMV"}
COUNTER_SLOTS = ("bitmask", "csr16", "bitmask-bf16", "csr16-bf16", "bitmask-int8", "bitmask-int4", "dense-int8",
                 "dense-int4")  # the C counter layout (SR_NLAYOUT slots per ISA)
# Quantized values (int8/int4 codes + scales): which (layout, ISA) pairs have a kernel. AVX-512 needs
# VBMI2 (vpexpandb); AVX2 runs the dense layout only (no byte expand); portable runs both.
QUANT_LAYOUTS = ("dense", "bitmask")
QUANT_IMPLEMENTED = {("bitmask", "avx512"), ("bitmask", "portable"), ("dense", "avx512"), ("dense", "avx2"),
                     ("dense", "portable")}
FEAT_VBMI2 = 1 << 3
FEAT_VNNI = 1 << 4  # AVX-512 VNNI (vpdpbusd): the W8A8 products of csrc/w8a8.inc
ERRORS = {-1: "the CPU does not support this path", -2: "out of memory", -3: "bad arguments"}
ABI_MISMATCH = "the compiled kernels do not match this Python package: rebuild with pip install -e ."

_cdll: Optional[ctypes.CDLL] = None
_reason: Optional[str] = None
_path: Optional[str] = None  # the file loaded (also the ONNX Runtime custom-op library)


class AbiMismatch(ConfigError):
    """The loaded library's structs differ from their ctypes mirrors (a stale build)."""


def check_structs(lb: ctypes.CDLL, mirrors: Mapping[str, type[ctypes.Structure]]) -> None:
    """Compare each ctypes mirror with the C struct of that name (``sr_struct_size``: sizeof;
    ``sr_field_offset``: each field's offset, looked up by the mirror's field name); raise
    :class:`AbiMismatch` with one line naming the fix when any differs. Why: ctypes cannot read the
    C header, so a struct changed on one side only would otherwise be read as garbage, silently."""
    if not hasattr(lb, "sr_struct_size") or not hasattr(lb, "sr_field_offset"):
        raise AbiMismatch(f"{ABI_MISMATCH} (the library predates the struct check)")
    lb.sr_struct_size.argtypes = [ctypes.c_char_p]
    lb.sr_struct_size.restype = ctypes.c_size_t
    lb.sr_field_offset.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lb.sr_field_offset.restype = ctypes.c_int64
    for name, cls in mirrors.items():
        size, mine = int(lb.sr_struct_size(name.encode())), ctypes.sizeof(cls)
        if size != mine:
            raise AbiMismatch(f"{ABI_MISMATCH} ({name} is {size} bytes in the library, {mine} in Python)")
        for field in (f[0] for f in cls._fields_):
            theirs, ours = int(lb.sr_field_offset(name.encode(), field.encode())), getattr(cls, field).offset
            if theirs != ours:
                where = "has no such field" if theirs < 0 else f"puts it at byte {theirs}"
                raise AbiMismatch(f"{ABI_MISMATCH} ({name}.{field} is at byte {ours} in Python; the library {where})")


def _load() -> Optional[ctypes.CDLL]:
    global _cdll, _reason, _path
    if _cdll is not None or _reason is not None:
        return _cdll
    try:
        override = os.environ.get(ENV_LIB)  # developers: test a freshly built .so without reinstalling
        spec = importlib.util.find_spec("sparse_runtime.kernels._sparse_kernels") if not override else None
        if override:
            lib = ctypes.CDLL(override)
        elif spec is None or not spec.origin:
            raise ImportError("the compiled extension sparse_runtime.kernels._sparse_kernels is not installed "
                              "(reinstall with `pip install -e .`; a C++ compiler and Python headers are needed)")
        else:
            lib = ctypes.CDLL(spec.origin)
        i64, p, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        for name in ("sr_bitmask_linear", "sr_csr16_linear", "sr_bitmask_linear_bf16", "sr_csr16_linear_bf16"):
            f = getattr(lib, name)
            f.argtypes = [c_int, p, i64, i64, i64, p, p, p, p, p, c_int]
            f.restype = c_int
        for name in ("sr_bitmask_densify", "sr_csr16_densify"):
            f = getattr(lib, name)
            f.argtypes = [i64, i64, p, p, p, p, c_int]
            f.restype = None
        lib.sr_cpu_features.restype = c_int
        lib.sr_has_openmp.restype = c_int
        lib.sr_get_counters.argtypes = [p]
        lib.sr_get_counters.restype = None
        lib.sr_reset_counters.restype = None
        lib.sr_set_xt_min_batch.argtypes = [i64]
        if hasattr(lib, "sr_set_avx512_walk"):  # tests' and benchmarks' hook: AVX-512 prefill batches' kernel
            lib.sr_set_avx512_walk.argtypes = [c_int]
            lib.sr_set_avx512_walk.restype = None
        if hasattr(lib, "sr_set_blk_min_batch"):  # benchmarks' hook for the K-blocked walk switch
            lib.sr_set_blk_min_batch.argtypes = [i64]
        lib.sr_set_gemv_variant.argtypes = [c_int]
        if hasattr(lib, "sr_set_avx2_blk"):  # benchmarks' and tests' hook for the AVX2 K-blocked walk
            lib.sr_set_avx2_blk.argtypes = [i64, i64]
        lib.sr_set_gemv_form.argtypes = [c_int, c_int]
        lib.sr_obs_columns.argtypes = [c_int, p, p, p, p, i64, i64, i64, i64, c_int]
        lib.sr_obs_columns.restype = c_int
        # densify to bf16 (csrc/densify.cpp; prefill's bf16 GEMM, kernels/prefill.py)
        if hasattr(lib, "sr_bitmask_densify_bf16"):
            lib.sr_densify_bf16_supported.argtypes = [c_int, c_int, c_int]
            lib.sr_densify_bf16_supported.restype = c_int
            for name in ("sr_bitmask_densify_bf16", "sr_csr16_densify_bf16"):
                getattr(lib, name).argtypes = [c_int, i64, i64, p, p, c_int, p, p, c_int]
                getattr(lib, name).restype = c_int
        # prefill on AMX tiles (csrc/amx_prefill.cpp; kernels/prefill.py)
        if hasattr(lib, "sr_amx_bitmask_linear"):
            lib.sr_amx_supported.restype = c_int
            lib.sr_amx_bitmask_linear.argtypes = [i64, i64, i64, p, p, p, c_int, p, i64, p, p, p, p, c_int, p,
                                                  ctypes.c_float, c_int, c_int]
            lib.sr_amx_bitmask_linear.restype = c_int
        if hasattr(lib, "sr_bf16_walk_linear"):  # the bf16 prefill walk (csrc/bf16_walk.inc; kernels/prefill.py)
            lib.sr_bf16_walk_supported.restype = c_int
            lib.sr_bf16_walk_linear.argtypes = lib.sr_amx_bitmask_linear.argtypes
            lib.sr_bf16_walk_linear.restype = c_int
        if hasattr(lib, "sr_avx2_prefill_linear"):  # the AVX2 prefill walk with glue (kernels/prefill.py)
            lib.sr_avx2_prefill_linear.argtypes = [i64, i64, i64, p, c_int, p, p, p, p, p, c_int, p, ctypes.c_float,
                                                   c_int, c_int, c_int]
            lib.sr_avx2_prefill_linear.restype = c_int
        if hasattr(lib, "sr_avx2_q_prefill_linear"):  # the walk over dense int8 / int4 codes (csrc/quant_kernels.inc)
            lib.sr_avx2_q_prefill_linear.argtypes = [p, i64, p, p, c_int, p, ctypes.c_float, c_int, c_int]
            lib.sr_avx2_q_prefill_linear.restype = c_int
        if hasattr(lib, "sr_prefill_attention"):  # csrc/prefill_attention.cpp
            lib.sr_prefill_attention.argtypes = [p, i64, i64, p, p, i64, i64, p, i64, i64, i64, i64, i64, i64, i64,
                                                 ctypes.c_float, c_int, c_int]
            lib.sr_prefill_attention.restype = c_int
        if hasattr(lib, "sr_rope_rows"):  # prefill's C glue (csrc/prefill_glue.cpp)
            lib.sr_rope_rows.argtypes = [p, i64, i64, i64, i64, i64, p, p]
            lib.sr_rope_rows.restype = c_int
        from .decode import STRUCTS  # the ctypes mirrors (decode imports this module: import here)

        check_structs(lib, STRUCTS)
        _cdll, _path = lib, override or spec.origin
    except AbiMismatch as e:
        _reason = str(e)
    except (OSError, ImportError, AttributeError) as e:
        _reason = f"sparse kernels unavailable: {e}"
    return _cdll


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    _load()
    return _reason


def library_path() -> str:
    """Path of the loaded shared object: ``SessionOptions.register_custom_ops_library`` takes it (it
    exports ORT's ``RegisterCustomOps``), and loading the same file keeps one set of counters."""
    lib()
    return str(_path)


def lib() -> ctypes.CDLL:
    lb = _load()
    if lb is None:
        raise ConfigError(_reason or "sparse kernels unavailable")
    return lb


def supported_isas() -> list[str]:
    """ISAs this CPU (and OS) can run, from cpuid via the extension; [] without the extension."""
    lb = _load()
    if lb is None:
        return []
    f = lb.sr_cpu_features()
    return [name for i, name in enumerate(ISAS) if f & (1 << i)]


def select_isa(isa: Optional[str] = None) -> str:
    """The ISA to use: ``isa`` if given, else $SPARSE_RUNTIME_KERNEL_ISA, else the best supported."""
    want = (isa or os.environ.get(ENV_ISA, "") or "").strip().lower() or None
    have = supported_isas()
    if not have:
        raise ConfigError(unavailable_reason() or "sparse kernels unavailable")
    if want is None:
        return have[-1]
    if want not in ISAS:
        raise ConfigError(f"unknown kernel ISA {want!r} (from {ENV_ISA} or isa=); choose one of {', '.join(ISAS)}")
    if want not in have:
        raise ConfigError(f"this CPU cannot run the {want} kernels (supported: {', '.join(have)}); "
                          f"unset {ENV_ISA} or pick a supported one")
    return want


def select_layout(isa: str, layout: Optional[str] = None) -> str:
    lay = (layout or os.environ.get(ENV_LAYOUT, "") or "").strip().lower() or DEFAULT_LAYOUT[isa]
    if (lay, isa) not in IMPLEMENTED:
        ok = sorted(l for l, i in IMPLEMENTED if i == isa)
        raise ConfigError(f"layout {lay!r} has no {isa} kernel; for {isa} use {', '.join(ok)}")
    return lay


def supports_bf16(isa: str, layout: Optional[str] = None) -> bool:
    """bf16 values run on portable and AVX2 (csr16) everywhere, on AVX-512 only with VBMI2 (16-bit
    expand). ``layout``: also require that layout's bf16 kernel on ``isa``."""
    lb = _load()
    if lb is None or isa not in supported_isas():
        return False
    if layout is not None and (layout, isa) not in IMPLEMENTED_BF16:
        return False
    return isa != "avx512" or bool(lb.sr_cpu_features() & FEAT_VBMI2)


def quant_isa(isa: str, layout: str) -> str:
    """The path that runs quantized values of ``layout`` when ``isa`` is asked for (what the C side
    does too): AVX-512 without VBMI2 runs dense codes on AVX2, bitmask codes portably; AVX2 runs
    bitmask codes portably (it has no byte expand)."""
    lb = _load()
    if isa == "avx512" and not (lb is not None and lb.sr_cpu_features() & FEAT_VBMI2):
        isa = "avx2" if layout == "dense" and "avx2" in supported_isas() else "portable"
    return isa if (layout, isa) in QUANT_IMPLEMENTED else "portable"


def w8a8_isa(isa: str, layout: str) -> str:
    """The path that runs int8 codes of ``layout`` with int8 activations (W8A8) when ``isa`` is asked
    for: AVX-512 where the codes run there and the CPU has VNNI, else portable (plain integer loops:
    correct, several times slower than the weight-only kernels; the engines refuse it there)."""
    lb = _load()
    if quant_isa(isa, layout) == "avx512" and lb is not None and lb.sr_cpu_features() & FEAT_VNNI:
        return "avx512"
    return "portable"


def counters() -> dict[str, int]:
    """Calls of each compiled path since load (or reset): evidence that the sparse path ran."""
    lb = _load()
    if lb is None:
        return {}
    buf = (ctypes.c_int64 * (len(ISAS) * len(COUNTER_SLOTS)))()
    lb.sr_get_counters(buf)
    def implemented(slot: str, isa: str) -> bool:
        layout, _, vt = slot.partition("-")
        return (layout, isa) in (QUANT_IMPLEMENTED if vt.startswith("int") else IMPLEMENTED)

    return {f"{slot}/{isa}": int(buf[i * len(COUNTER_SLOTS) + j]) for i, isa in enumerate(ISAS)
            for j, slot in enumerate(COUNTER_SLOTS) if implemented(slot, isa)}


def reset_counters() -> None:
    lb = _load()
    if lb is not None:
        lb.sr_reset_counters()


def set_gemv_variant(name: str, isa: str = "avx512") -> None:
    """Select an ISA path's batch-1 kernel form for this process. AVX-512: ``memory`` (vexpandps
    from memory, expand-load) or ``register`` (plain load + register vexpandps); AVX2 (csr16):
    ``gather`` (vgatherdps) or ``insert`` (scalar loads + vinsertps)."""
    forms = GEMV_FORMS.get(isa, {})
    if name not in forms:
        raise ConfigError(f"unknown {isa} batch-1 kernel form {name!r}; choose one of {', '.join(forms) or 'none'}")
    lib().sr_set_gemv_form(ISAS.index(isa), forms[name])


def obs_columns(W1, Err1, Hinv1, scale, i0: int, i1: int, threads: int) -> bool:
    """SparseGPT's sequential OBS updates for columns [i0, i1) of one block, in the compiled kernel
    (``sr_obs_columns`` in ``csrc/sparsegpt_solver.cpp``; see sparse_runtime/pruning/sparsegpt.py).
    Tensors: contiguous fp32 CPU, ``W1``/``Err1``/``scale`` [count, rows], ``Hinv1`` [count, count];
    ``W1`` and ``Err1`` are written in place. Returns False (nothing done) when the kernels are unavailable."""
    lb = _load()
    if lb is None:
        return False
    count, rows = W1.shape
    isa = ISAS.index(select_isa())  # $SPARSE_RUNTIME_KERNEL_ISA applies here too
    rc = lb.sr_obs_columns(isa, W1.data_ptr(), Err1.data_ptr(), Hinv1.data_ptr(), scale.data_ptr(), rows, count,
                           i0, i1, threads)
    if rc != 0:
        raise ConfigError(f"sr_obs_columns failed: {ERRORS.get(rc, rc)}")
    return True
