"""``SparseLinear``: a drop-in nn.Linear for merged sparse models, and ``sparsify_linears``.

Dispatch by batch size: the sparse kernel wins when a product is memory-bound (decode, small
batches) and can lose when it turns compute-bound (prefill), so each module carries
``batch_threshold``: inputs with at most that many tokens (rows of the flattened input) take the
sparse kernel, and ``sparse_ranges``: further token ranges where it also won (the win region need
not be one interval: on AVX-512 the expand tiles can lose narrowly at batch 2-4 while the index walk
wins clearly at 8-32). Everything else runs ``F.linear`` on the dense weight. Both are MEASURED on
this machine (:func:`measure_dispatch`: dense vs sparse at batch 1, 2, 4, ..., 128; a range spans
consecutive tried batches that all won, so an untried size is sparse only between two winners),
so the module is never slower than dense at any batch up to the measurement's noise. ``sparse_calls`` / ``dense_calls`` count which path ran (and the C library
counts its own calls per path, :func:`sparse_runtime.kernels.counters`).
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
from . import _lib
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

    Two forms do the same arithmetic on each path that has them (``_lib.GEMV_FORMS``):
    - AVX-512 (bitmask): ``memory`` expands the packed values straight from memory (``vexpandps
      zmm{k}, [mem]``), ``register`` loads 64 bytes and expands in a register. The memory form is
      microcoded on some cores (e.g. AMD Zen 4); on this project's Xeon it won on a quiet machine
      (kernels_layers.md) and lost under heavy load.
    - AVX2 (csr16): ``gather`` reads x with ``vgatherdps``, ``insert`` with scalar loads and
      ``vinsertps``. Gathers are microcoded on AMD Zen 1/2, where the gather form lost to dense at
      70 % and the insert form did not (kernels_layers_avx2.md).
    So it is measured, not assumed: the ISA's variable (``_lib.ENV_GEMV_FORM``, e.g.
    ``$SPARSE_RUNTIME_AVX512_GEMV`` = ``memory`` | ``register``, ``$SPARSE_RUNTIME_AVX2_GEMV`` =
    ``gather`` | ``insert``) forces one; otherwise (``auto``) the forms are timed alternately on a
    2048 x 2048 matrix at 70 % sparsity, batch 1 (a few ms), and the faster median wins. The result
    is in :func:`gemv_choice`.
    """
    forms = _lib.GEMV_FORMS[isa]
    if isa in _GEMV and not force:
        return str(_GEMV[isa]["variant"])
    env = _lib.ENV_GEMV_FORM[isa]
    want = os.environ.get(env, "auto").strip().lower() or "auto"
    if want != "auto":
        _lib.set_gemv_variant(want, isa)
        _GEMV[isa] = dict(variant=want, how=f"${env}")
        return want
    layout = _lib.GEMV_FORM_LAYOUT[isa]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 2048, generator=g)
    w = w * (torch.rand(w.shape, generator=g) >= 0.7)
    p = pack(w, layout)
    x = torch.randn(1, 2048, generator=g)

    def call():
        return _run(x, p.index, p.values, p.row_ptr, None, 2048, 2048, _lib.LAYOUT_IDS[layout], _ISA_ID[isa])

    times: dict[str, list[float]] = {name: [] for name in forms}
    for name in times:  # warm-up
        _lib.set_gemv_variant(name, isa)
        call()
    for _ in range(repeats):
        for name in times:
            _lib.set_gemv_variant(name, isa)
            times[name].append(_median_ms(call, 3))
    med = {name: statistics.median(t) for name, t in times.items()}
    best = min(med, key=med.get)
    _lib.set_gemv_variant(best, isa)
    _GEMV[isa] = dict(variant=best, how="measured", ms=med)
    return best


def gemv_choice(isa: str = "avx512") -> dict[str, object]:
    """Which batch-1 form of ``isa`` this process uses and why (empty before its first module)."""
    return dict(_GEMV.get(isa, {}))


class SparseLinear(nn.Module):
    """y = x W^T + b with W held in a packed sparse layout (fp32 or bf16 values; inference only).

    Buffers: ``index``/``values``/``row_ptr`` (the layout) and, with ``keep_dense``, ``weight``
    (the original dense weight, used for batches above the threshold and for autograd; it is never
    read on the sparse path, so it costs memory, not bandwidth). Without ``keep_dense`` the dense
    fallback rebuilds the weight per call with a C scatter kernel.
    """

    def __init__(self, packed: PackedWeight, bias: Optional[torch.Tensor] = None, *, isa: Optional[str] = None,
                 dense_weight: Optional[torch.Tensor] = None, batch_threshold: int = 16, use_op: bool = False):
        super().__init__()
        self.isa = _lib.select_isa(isa)
        if (packed.layout, self.isa) not in _lib.IMPLEMENTED:
            raise ConfigError(f"no {self.isa} kernel for layout {packed.layout!r}")
        if _lib.GEMV_FORM_LAYOUT.get(self.isa) == packed.layout:
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
        self._ids = (_lib.LAYOUT_IDS[self.layout], _ISA_ID[self.isa])
        self.sparse_calls = 0
        self.dense_calls = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, isa: Optional[str] = None, layout: Optional[str] = None,
                    keep_dense: bool = True, batch_threshold: int = 16, use_op: bool = False,
                    value_dtype: Optional[str] = None) -> "SparseLinear":
        """``value_dtype`` defaults to the weight's: bf16 weights keep bf16 values (compared with dense bf16)."""
        isa = _lib.select_isa(isa)
        w = linear.weight.detach()
        value_dtype = value_dtype or ("bfloat16" if w.dtype == torch.bfloat16 else "float32")
        if value_dtype == "bfloat16" and not _lib.supports_bf16(isa):
            raise ConfigError(f"the {isa} path has no bf16 kernel on this CPU (AVX-512 needs VBMI2); "
                              f"use value_dtype='float32' or isa='portable'/'avx2'")
        packed = pack(w, _lib.select_layout(isa, layout), value_dtype)
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
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

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
    """Measurements are shared per (isa, layout, dtype, shape, density to 0.05, threads, batches)."""
    return (module.isa, module.layout, str(module.values.dtype), module.out_features, module.in_features,
            round(module.packed.density * 20) / 20, torch.get_num_threads(), batches)


def _sparse_wins(module: SparseLinear, batch: int, repeats: int, margin: float) -> bool:
    """Whether the sparse kernel was not slower than dense F.linear at ``batch`` tokens: both timed
    alternately (so drift on a shared machine hits both alike), medians of ``repeats`` compared."""
    w = module.weight
    bias = None if module.bias is None else module.bias.to(w.dtype)
    x = torch.randn(batch, module.in_features, dtype=w.dtype)  # bf16 values are compared with dense bf16
    d_times, s_times = [], []
    for _ in range(repeats):
        d_times.append(_median_ms(lambda: F.linear(x, w, bias), 1))
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
    if not _lib.available():
        raise ConfigError(_lib.unavailable_reason() or "sparse kernels unavailable")
    isa = _lib.select_isa(isa)
    layout = _lib.select_layout(isa, layout)
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
        if w.dtype == torch.bfloat16 and not _lib.supports_bf16(isa):
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
