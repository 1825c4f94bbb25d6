"""``SparseLinear``: a drop-in nn.Linear for merged sparse models, and ``sparsify_linears``.

Dispatch by batch size: the sparse kernel wins when a product is memory-bound (decode, small
batches) and can lose when it turns compute-bound (prefill), so each module carries
``batch_threshold``: inputs with at most that many tokens (rows of the flattened input) take the
sparse kernel, and ``sparse_ranges``: further token ranges where it also won (the win region need
not be one interval: on AVX-512 the expand tiles can lose narrowly at batch 2-4 while the index walk
wins clearly at 8-32). Everything else runs ``F.linear`` on the dense weight. Both are MEASURED on
this machine (:func:`measure_dispatch`: dense vs sparse at batch 1, 2, 4, ..., 128; a range spans
consecutive tried batches that all won, so an untried size is sparse only between two winners),
so the module is never slower than dense at any batch up to the measurement's noise.

"Dense" is whatever the module's dense path costs: ``F.linear`` on a kept dense weight
(``keep_dense``), or, when none is kept (the lean engines: a sparse model must take less memory
than its dense original), rebuilding the weight from the packed form into a reusable
:class:`DenseScratch` (one buffer of the largest weight, shared by all modules that run one at a
time) and ``F.linear`` on it; the dispatch measurement times that whole path, scatter included.
``sparse_calls`` / ``dense_calls`` count which path ran (and the C library counts its own calls per
path, :func:`sparse_runtime.kernels.counters`).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import native
from .layout import PackedWeight, pack
from .ops import _ISA_ID, _run, densify, sparse_linear_op

# Batches tried by measure_threshold; the threshold is one of them (or 0 = always dense).
THRESHOLD_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
_THRESHOLD_CACHE: dict[tuple, int] = {}
_DISPATCH_CACHE: dict[tuple, tuple[int, ...]] = {}
_GEMV: dict[str, dict[str, object]] = {}  # per ISA: the chosen batch-1 form and the timings behind it


@torch.inference_mode()
def choose_gemv_variant(force: bool = False, repeats: int = 9, isa: str = "avx512") -> str:
    """The batch-1 kernel form of an ISA path for this process, chosen once.

    Two forms do the same arithmetic on each path that has them (``native.GEMV_FORMS``):
    - AVX-512 (bitmask): ``memory`` expands the packed values straight from memory (``vexpandps
      zmm{k}, [mem]``), ``register`` loads 64 bytes and expands in a register. The memory form is
      microcoded on some cores (e.g. AMD Zen 4); on this project's Xeon it won on a quiet machine
      (kernels_layers.md) and lost under heavy load.
    - AVX2 (csr16): ``gather`` reads x with ``vgatherdps``, ``insert`` with scalar loads and
      ``vinsertps``. Gathers are microcoded on AMD Zen 1/2, where the gather form lost to dense at
      70 % and the insert form did not (kernels_layers_avx2.md).
    So it is measured, not assumed: the ISA's variable (``native.ENV_GEMV_FORM``, e.g.
    ``$SPARSE_RUNTIME_AVX512_GEMV`` = ``memory`` | ``register``, ``$SPARSE_RUNTIME_AVX2_GEMV`` =
    ``gather`` | ``insert``) forces one; otherwise (``auto``) the forms are timed alternately on a
    2048 x 2048 matrix at 70 % sparsity, batch 1 (a few ms), and the faster median wins. The result
    is in :func:`gemv_choice`.
    """
    forms = native.GEMV_FORMS[isa]
    if isa in _GEMV and not force:
        return str(_GEMV[isa]["variant"])
    env = native.ENV_GEMV_FORM[isa]
    want = os.environ.get(env, "auto").strip().lower() or "auto"
    if want != "auto":
        native.set_gemv_variant(want, isa)
        _GEMV[isa] = dict(variant=want, how=f"${env}")
        return want
    layout = native.GEMV_FORM_LAYOUT[isa]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 2048, generator=g)
    w = w * (torch.rand(w.shape, generator=g) >= 0.7)
    p = pack(w, layout)
    x = torch.randn(1, 2048, generator=g)

    def call():
        return _run(x, p.index, p.values, p.row_ptr, None, 2048, 2048, native.LAYOUT_IDS[layout], _ISA_ID[isa])

    times: dict[str, list[float]] = {name: [] for name in forms}
    for name in times:  # warm-up
        native.set_gemv_variant(name, isa)
        call()
    for _ in range(repeats):
        for name in times:
            native.set_gemv_variant(name, isa)
            times[name].append(_median_ms(call, 3))
    med = {name: statistics.median(t) for name, t in times.items()}
    best = min(med, key=med.get)
    native.set_gemv_variant(best, isa)
    _GEMV[isa] = dict(variant=best, how="measured", ms=med)
    return best


def gemv_choice(isa: str = "avx512") -> dict[str, object]:
    """Which batch-1 form of ``isa`` this process uses and why (empty before its first module)."""
    return dict(_GEMV.get(isa, {}))


class DenseScratch:
    """One reusable buffer per dtype for weights rebuilt from their packed form.

    Why: a module that keeps no dense copy still needs a dense weight for products where the GEMM
    beats the sparse kernel (prefill). Allocating it per call costs page faults on every call, and
    keeping one per module is the dense copy again; modules of one model run one at a time, so one
    buffer the size of the largest weight serves all of them (memory: that one weight). Not for
    concurrent use from several threads.
    """

    def __init__(self) -> None:
        self._bufs: dict[torch.dtype, torch.Tensor] = {}

    def get(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A ``[rows, cols]`` view of the buffer of ``dtype`` (grown when too small; contents undefined)."""
        n = rows * cols
        buf = self._bufs.get(dtype)
        if buf is None or buf.numel() < n:
            self._bufs.pop(dtype, None)  # free the old one before allocating the larger one
            buf = self._bufs[dtype] = torch.empty(n, dtype=dtype)
        return buf[:n].view(rows, cols)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


DENSIFY_CHUNK = 1 << 22  # elements of the fp32 staging block when rebuilding bf16 values


def densify_into(packed: PackedWeight, out: torch.Tensor, threads: Optional[int] = None) -> torch.Tensor:
    """Write the dense ``[N, K]`` weight of ``packed`` into ``out`` (float32, or bfloat16 for bf16
    values) with the C scatter kernel; returns ``out``.

    The compiled scatter reads fp32 values, so bf16 values are rebuilt in row blocks of about
    ``DENSIFY_CHUNK`` elements: the block's values widened (exact), scattered into an fp32 staging
    block, then narrowed into ``out`` (exact: they were bf16). Memory beyond ``out``: one block."""
    n, k = packed.out_features, packed.in_features
    if tuple(out.shape) != (n, k) or not out.is_contiguous():
        raise ConfigError(f"densify_into needs a contiguous [{n}, {k}] output, got {tuple(out.shape)}")
    lb = native.lib()
    fn = lb.sr_bitmask_densify if packed.layout == "bitmask" else lb.sr_csr16_densify
    threads = threads or torch.get_num_threads()
    if packed.values.dtype == torch.float32 and out.dtype == torch.float32:
        fn(k, n, packed.index.data_ptr(), packed.values.data_ptr(), packed.row_ptr.data_ptr(), out.data_ptr(), threads)
        return out
    if out.dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"densify_into writes float32 or bfloat16, not {out.dtype}")
    rp = packed.row_ptr
    step = max(1, DENSIFY_CHUNK // max(k, 1))
    stage = torch.empty(min(step, n), k, dtype=torch.float32)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        v0, v1 = int(rp[r0]), int(rp[r1])
        vals = packed.values[v0:v1].float().contiguous()
        rows = rp[r0:r1 + 1] - v0  # the block's row offsets, relative to its own values
        index = packed.index[r0:r1] if packed.layout == "bitmask" else packed.index[v0:v1]
        blk = stage[:r1 - r0]
        fn(k, r1 - r0, index.data_ptr(), vals.data_ptr(), rows.data_ptr(), blk.data_ptr(), threads)
        out[r0:r1].copy_(blk)
    return out


class SparseLinear(nn.Module):
    """y = x W^T + b with W held in a packed sparse layout (fp32 or bf16 values; inference only).

    Buffers: ``index``/``values``/``row_ptr`` (the layout) and, with ``keep_dense``, ``weight``
    (the original dense weight, used for batches above the threshold and for autograd; it is never
    read on the sparse path, so it costs memory, not bandwidth). Without ``keep_dense`` the dense
    fallback rebuilds the weight per call with a C scatter kernel, into ``scratch`` (a
    :class:`DenseScratch`, shared by a model's modules) when given, and multiplies in the value dtype
    (bf16 values: a bf16 GEMM, as the dense bf16 model does; the result is returned in x's dtype).
    """

    def __init__(self, packed: PackedWeight, bias: Optional[torch.Tensor] = None, *, isa: Optional[str] = None,
                 dense_weight: Optional[torch.Tensor] = None, batch_threshold: int = 16, use_op: bool = False,
                 scratch: Optional[DenseScratch] = None):
        super().__init__()
        self.isa = native.select_isa(isa)
        if (packed.layout, self.isa) not in native.IMPLEMENTED:
            raise ConfigError(f"no {self.isa} kernel for layout {packed.layout!r}")
        if native.GEMV_FORM_LAYOUT.get(self.isa) == packed.layout:
            choose_gemv_variant(isa=self.isa)  # once per process and ISA
        self.layout = packed.layout
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.register_buffer("index", packed.index)
        self.register_buffer("values", packed.values)
        self.register_buffer("row_ptr", packed.row_ptr)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.register_buffer("dense_weight", dense_weight)
        self.batch_threshold = int(batch_threshold)
        self.sparse_ranges: tuple[tuple[int, int], ...] = ()  # (lo, hi) token counts beyond the threshold
        self.use_op = use_op
        self.scratch = scratch
        self._ids = (native.LAYOUT_IDS[self.layout], _ISA_ID[self.isa])
        self.sparse_calls = 0
        self.dense_calls = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, isa: Optional[str] = None, layout: Optional[str] = None,
                    keep_dense: bool = True, batch_threshold: int = 16, use_op: bool = False,
                    value_dtype: Optional[str] = None) -> "SparseLinear":
        """``value_dtype`` defaults to the weight's: bf16 weights keep bf16 values (compared with dense bf16)."""
        isa = native.select_isa(isa)
        w = linear.weight.detach()
        value_dtype = value_dtype or ("bfloat16" if w.dtype == torch.bfloat16 else "float32")
        if value_dtype == "bfloat16" and not native.supports_bf16(isa):
            raise ConfigError(f"the {isa} path has no bf16 kernel on this CPU (AVX-512 needs VBMI2); "
                              f"use value_dtype='float32' or isa='portable'/'avx2'")
        packed = pack(w, native.select_layout(isa, layout), value_dtype)
        dense = w.to(packed.values.dtype).contiguous() if keep_dense else None
        return cls(packed, linear.bias, isa=isa, dense_weight=dense, batch_threshold=batch_threshold, use_op=use_op)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.layout, self.out_features, self.in_features, self.index, self.values, self.row_ptr)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (kept, or rebuilt from the layout): for code that inspects ``.weight``."""
        return self.dense_weight if self.dense_weight is not None else densify(self.packed)

    def sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.index, self.values, self.row_ptr, self.bias, self.out_features, self.in_features, *self._ids)
        if self.use_op or torch.compiler.is_compiling():
            return sparse_linear_op(*args)
        return _run(*args)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense path: F.linear on the kept weight (in x's dtype, as before), or on the weight
        rebuilt into the scratch buffer (in the value dtype; no per-module copy is kept)."""
        if self.dense_weight is not None or self.scratch is None:
            w = self.weight
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        w = densify_into(self.packed, self.scratch.get(self.out_features, self.in_features, self.values.dtype))
        if w.dtype == x.dtype:
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        y = F.linear(x.to(w.dtype), w).to(x.dtype)  # bf16 values: a bf16 GEMM; the bias added in x's dtype
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def takes_sparse(self, tokens: int) -> bool:
        """Whether ``tokens`` rows go to the sparse kernel (the measured dispatch)."""
        return tokens <= self.batch_threshold or any(lo <= tokens <= hi for lo, hi in self.sparse_ranges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // max(self.in_features, 1)
        if (self.takes_sparse(tokens) and x.device.type == "cpu"
                and (x.dtype == torch.float32 or x.dtype == self.values.dtype == torch.bfloat16)
                and not (x.requires_grad and torch.is_grad_enabled())):
            self.sparse_calls += 1
            return self.sparse_forward(x)
        self.dense_calls += 1
        return self.dense_forward(x)

    def extra_repr(self) -> str:
        p = self.packed
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                f"isa={self.isa}, values={str(self.values.dtype).replace('torch.', '')}, density={p.density:.3f}, "
                f"batch_threshold={self.batch_threshold}, sparse_ranges={list(self.sparse_ranges)}")


def _median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _dispatch_key(module: SparseLinear, batches: tuple[int, ...]) -> tuple:
    """Measurements are shared per (isa, layout, dtype, shape, density to 0.05, threads, dense form,
    batches)."""
    return (module.isa, module.layout, str(module.values.dtype), module.out_features, module.in_features,
            round(module.packed.density * 20) / 20, torch.get_num_threads(), _dense_form(module), batches)


def _dense_form(module: SparseLinear) -> str:
    """What the module's dense path is: a kept weight, a rebuild into scratch, or a rebuild per call."""
    return "kept" if module.dense_weight is not None else ("scratch" if module.scratch is not None else "rebuilt")


def _sparse_wins(module: SparseLinear, batch: int, repeats: int, margin: float) -> bool:
    """Whether the sparse kernel was not slower than the module's dense path at ``batch`` tokens:
    both timed alternately (so drift on a shared machine hits both alike), medians of ``repeats``
    compared. With a kept weight the dense path is F.linear on it (bf16 values against dense bf16);
    without one it is the rebuild into scratch plus F.linear, timed whole, on fp32 activations (what
    the lean engines pass)."""
    if module.dense_weight is not None or module.scratch is None:
        w = module.weight
        bias = None if module.bias is None else module.bias.to(w.dtype)
        x = torch.randn(batch, module.in_features, dtype=w.dtype)  # bf16 values are compared with dense bf16

        def dense():
            return F.linear(x, w, bias)
    else:
        x = torch.randn(batch, module.in_features)
        dense = lambda: module.dense_forward(x)  # noqa: E731
    d_times, s_times = [], []
    for _ in range(repeats):
        d_times.append(_median_ms(dense, 1))
        s_times.append(_median_ms(lambda: module.sparse_forward(x), 1))
    return statistics.median(s_times) <= statistics.median(d_times) * margin


@torch.inference_mode()
def measure_threshold(module: SparseLinear, batches: Iterable[int] = THRESHOLD_BATCHES, repeats: int = 5,
                      margin: float = 1.0) -> int:
    """Largest tried batch up to which the sparse kernel was never slower than dense F.linear.

    Stops at the first batch where sparse loses (sparse > dense * margin); returns 0 if it loses
    already at batch 1. Measured once per :func:`_dispatch_key` and cached for the process.
    """
    key = _dispatch_key(module, tuple(batches))
    if key not in _THRESHOLD_CACHE:
        best = 0
        for b in key[-1]:
            if not _sparse_wins(module, b, repeats, margin):
                break
            best = b
        _THRESHOLD_CACHE[key] = best
    return _THRESHOLD_CACHE[key]


@torch.inference_mode()
def measure_dispatch(module: SparseLinear, batches: Iterable[int] = THRESHOLD_BATCHES, repeats: int = 5,
                     margin: float = 1.0) -> tuple[int, ...]:
    """Every tried batch at which the sparse kernel was not slower than dense F.linear.

    Like :func:`measure_threshold` but it does not stop at the first loss: the win region can have
    a gap (see the module docstring). :func:`apply_dispatch` turns the result into a module's
    ``batch_threshold`` and ``sparse_ranges``.
    """
    key = _dispatch_key(module, tuple(batches))
    if key not in _DISPATCH_CACHE:
        _DISPATCH_CACHE[key] = tuple(b for b in key[-1] if _sparse_wins(module, b, repeats, margin))
    return _DISPATCH_CACHE[key]


def dispatch_ranges(won: Iterable[int], batches: Iterable[int] = THRESHOLD_BATCHES) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(batch_threshold, sparse_ranges) from the winning batches: the threshold is the end of a run of
    winners starting at the first tried batch (0 if that one lost); every later run of consecutive
    winners becomes one (first, last) range."""
    won, runs, cur = set(won), [], []
    for b in batches:
        if b in won:
            cur.append(b)
        elif cur:
            runs.append((cur[0], cur[-1]))
            cur = []
    if cur:
        runs.append((cur[0], cur[-1]))
    first = next(iter(batches), None)
    threshold = runs[0][1] if runs and runs[0][0] == first else 0
    return threshold, tuple(r for r in runs if not (r[0] == first))


def apply_dispatch(module: SparseLinear, batches: Iterable[int] = THRESHOLD_BATCHES) -> SparseLinear:
    """Measure (or reuse) the module's dispatch and set ``batch_threshold`` and ``sparse_ranges``."""
    batches = tuple(batches)
    module.batch_threshold, module.sparse_ranges = dispatch_ranges(measure_dispatch(module, batches), batches)
    return module


@dataclass
class SparsifyReport:
    swapped: dict[str, SparseLinear]
    skipped: dict[str, str]  # name -> reason

    def summary(self) -> str:
        th = sorted({m.batch_threshold for m in self.swapped.values()})
        rng = sorted({r for m in self.swapped.values() for r in m.sparse_ranges})
        extra = f", sparse also at {rng}" if rng else ""
        return f"swapped {len(self.swapped)} linears (thresholds {th}{extra}), skipped {len(self.skipped)}"


def _candidates(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    try:
        from ..models import family_of

        return list(family_of(model).iter_linears(model))
    except Exception:  # not a supported family: every Linear except an output head
        return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def sparsify_linears(model: nn.Module, *, isa: Optional[str] = None, layout: Optional[str] = None,
                     min_sparsity: float = 0.3, keep_dense: bool = True, calibrate: bool = True,
                     batch_threshold: Optional[int] = None, names: Optional[Iterable[str]] = None,
                     use_op: bool = False) -> SparsifyReport:
    """Replace the merged sparse linears of ``model`` in place by :class:`SparseLinear`.

    Candidates are the family adapter's prunable block linears (never the tied lm_head), or
    ``names``. A layer is swapped if it is float32 (or bfloat16: bf16 values) on CPU with at least
    ``min_sparsity`` zeros
    (below that the kernel cannot beat dense). ``calibrate`` measures each distinct
    (shape, density) group's dispatch here (:func:`apply_dispatch`); else ``batch_threshold``
    (default 16) and no further ranges.
    """
    if not native.available():
        raise ConfigError(native.unavailable_reason() or "sparse kernels unavailable")
    isa = native.select_isa(isa)
    layout = native.select_layout(isa, layout)
    cands = _candidates(model)
    if names is not None:
        wanted = set(names)
        cands = [(n, m) for n, m in model.named_modules() if n in wanted and isinstance(m, nn.Linear)]
    swapped, skipped = {}, {}
    for name, lin in cands:
        w = lin.weight
        if w.dtype not in (torch.float32, torch.bfloat16) or w.device.type != "cpu":
            skipped[name] = f"{w.dtype} on {w.device} (kernels are float32/bfloat16 CPU)"
            continue
        if w.dtype == torch.bfloat16 and not native.supports_bf16(isa):
            skipped[name] = f"bf16 weights but the {isa} path has no bf16 kernel on this CPU"
            continue
        sp = float((w == 0).float().mean())
        if sp < min_sparsity:
            skipped[name] = f"sparsity {sp:.2f} < min_sparsity {min_sparsity}"
            continue
        mod = SparseLinear.from_linear(lin, isa=isa, layout=layout, keep_dense=keep_dense, use_op=use_op,
                                       batch_threshold=16 if batch_threshold is None else batch_threshold)
        if calibrate and batch_threshold is None:
            apply_dispatch(mod)
        _set_module(model, name, mod)
        swapped[name] = mod
    return SparsifyReport(swapped, skipped)


def call_counts(model: nn.Module) -> dict[str, int]:
    """Sparse and dense calls summed over a model's SparseLinear modules."""
    mods = [m for m in model.modules() if isinstance(m, SparseLinear)]
    return {"modules": len(mods), "sparse_calls": sum(m.sparse_calls for m in mods),
            "dense_calls": sum(m.dense_calls for m in mods)}
