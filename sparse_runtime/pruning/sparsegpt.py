"""SparseGPT: one-shot OBS pruning with weight reconstruction (Frantar & Alistarh, 2023; docs/methods.md#sparsegpt).

For one linear with inputs X, minimise ||W X - W' X||_2^2 over W' with the chosen sparsity:

- Hessian H = (2/N_tok) sum x x^T (the driver's ``hessian`` statistic, fp32). Dead input channels
  (H_jj = 0) get H_jj = 1 and W[:, j] = 0. Dampening H += lambda I with
  lambda = percdamp * mean(diag H) (``percdamp`` 0.01).
- Hinv = upper Cholesky factor of H^-1 (paper Sec. 3.4: the rows of this factor give the
  sequential OBS updates for all columns at once).
- Columns are processed in blocks of B = 128 (``blocksize``). Adaptive mask selection (paper
  Sec. 3.3): at the start of each block, score s = W_1^2 / diag(Hinv_1)^2 (OBS saliency, Eq. 3 with
  the Cholesky diagonal) on the block's CURRENT (already updated) weights and prune the lowest
  floor(numel * s) over the whole rows x B block. N:M: at every column i with i % M == 0 the N
  lowest saliencies among columns i..i+M-1 of each row.
- Column by column (Eq. 4 / Alg. 1): q = w with pruned entries zeroed, err = (w - q) / Hinv_ii,
  W_1[:, i:] -= err Hinv[i, i:]; after the block, the lazy batch update
  W[:, i2:] -= Err_1 Hinv[i1:i2, i2:].

Deviations from the official ``fasterprune`` (all documented in docs/pruning.md):
- the official threshold test ``tmp <= sort(tmp)[k]`` prunes k+1 entries per block (more on ties);
  we prune exactly k = floor(numel * s) (``topk``), so the layer's sparsity is the target's;
- if H + lambda I is not positive definite (the official code then crashes), the dampening is
  multiplied by 10 up to five times; a warning says so.

Joint sparsification and quantization (paper Sec. 3.5, Algorithm 1 with the quantize step): option
``quant`` (a scheme name, ``int4-g128``, ...) runs the same mask selection inside GPTQ's column loop,
so each column's pruning and rounding error both go to the later columns
(:func:`sparse_runtime.quant.gptq.obs_quantize`, in PyTorch; docs/quantization.md#joint).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from ..calibration import LayerTask
from ..errors import ConfigError
from ..sparsity import NMPattern
from .base import PRUNERS, PruneOutput, config_options

log = logging.getLogger(__name__)


def _inverse_cholesky(H: torch.Tensor, percdamp: float, name: str = "layer") -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1 (U^T U = H^-1), raising lambda if H is singular.

    Computed without forming H^-1: with J the reversal permutation and L_r = chol(J H J) (lower),
    H = V V^T for the upper-triangular V = J L_r J, so H^-1 = (V^-1)^T V^-1 and U = V^-1 = J L_r^-1 J.
    Same factor as the official cholesky -> cholesky_inverse -> cholesky(upper), about 5x faster on CPU.
    """
    n = H.shape[0]
    diag = torch.arange(n, device=H.device)
    damp = percdamp * torch.mean(torch.diag(H))
    if damp <= 0:
        damp = torch.tensor(1e-8, device=H.device)
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for attempt in range(6):
        Hd = H.clone()
        Hd[diag, diag] += damp
        Lr, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
        if int(info) == 0:
            U = torch.linalg.solve_triangular(Lr, eye, upper=False).flip(0, 1)
            if bool(torch.isfinite(U).all()):
                if attempt:
                    log.warning("SparseGPT: %s needed dampening x%d to be positive definite", name, 10 ** attempt)
                return U
        damp = damp * 10
    raise RuntimeError(f"SparseGPT: the Hessian of {name} is not positive definite even with heavy dampening")


def _select_group(W1: torch.Tensor, d1: torch.Tensor, mask1: torch.Tensor, scale: torch.Tensor, i: int,
                  pattern: NMPattern) -> None:
    """N:M mask of columns i..i+M-1 from their CURRENT (already updated) weights: the N lowest OBS
    saliencies w^2 / Hinv_ii^2 of each row are pruned; their error factors go into ``scale``."""
    sl = slice(i, i + pattern.m)
    sal = W1[sl] ** 2 / d1[sl].reshape(-1, 1) ** 2
    mask1[sl].scatter_(0, torch.topk(sal, pattern.n, dim=0, largest=False)[1], True)
    scale[sl] = mask1[sl].to(W1.dtype) / d1[sl].reshape(-1, 1)


def _native_obs():
    """The compiled OBS column loop (sparse_runtime.kernels), or None without the extension."""
    try:
        from ..kernels import native
    except Exception:  # pragma: no cover - depends on the build
        return None
    return native.obs_columns if native.available() else None


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    pattern: Optional[NMPattern] = None, *, percdamp: float = 0.01, blocksize: int = 128,
                    name: str = "layer", impl: str = "auto", quant=None) -> PruneOutput:
    """SparseGPT on a plain tensor: returns the reconstructed sparse weight and its keep-mask.

    ``impl``: the per-column OBS loop runs in the compiled kernel (``native``: one call per block,
    or per N:M group, threads over output rows) or in PyTorch (``python``: one rank-1 update per
    column, about 150 k small ops on SmolLM2, where per-op overhead dominates). ``auto`` = native
    on CPU when the kernels are built. Same arithmetic; results agree to float rounding.

    ``quant`` (a :class:`~sparse_runtime.quant.scheme.QuantScheme`): prune and quantize jointly
    (:func:`sparse_runtime.quant.gptq.obs_quantize`, PyTorch loop); the weight returned is then on
    the grid, with exact zeros where pruned (a kept weight that rounds to 0 is a kept 0 here).
    """
    if quant is not None:
        from ..quant.gptq import obs_quantize

        qw = obs_quantize(weight, hessian, quant, sparsity=sparsity, pattern=pattern, percdamp=percdamp,
                          blocksize=blocksize, name=name)
        return PruneOutput(qw.dequantize().to(weight.device, weight.dtype), qw.mask.to(weight.device))
    if impl not in ("auto", "native", "python"):
        raise ValueError(f"impl must be auto, native or python, not {impl!r}")
    native = _native_obs() if impl != "python" and weight.device.type == "cpu" else None
    if impl == "native" and native is None:
        raise RuntimeError("impl='native' needs the compiled kernels on a CPU tensor (pip install -e .)")
    threads = torch.get_num_threads()
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = hessian.detach().float().to(W.device).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_cholesky(H, percdamp, name)
    # Work on W^T so that a "column" of W is a contiguous row: the per-column loop is the hot path.
    Wt = W.t().contiguous()
    pruned_t = torch.zeros_like(Wt, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = Wt[i1:i2].clone()  # [count, rows]
        Err1 = torch.empty_like(W1)  # every row is written in the loop
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)  # True = pruned
        if pattern is None:
            k = int(W1.numel() * sparsity)
            if k:
                sal = W1 ** 2 / d1.reshape(-1, 1) ** 2
                idx = torch.topk(sal.reshape(-1), k, largest=False, sorted=False)[1]
                mask1.view(-1)[idx] = True
        # err_i = (w - q) / Hinv_ii = w * [pruned] / Hinv_ii: precompute the factor per entry
        scale = mask1.to(W1.dtype) / d1.reshape(-1, 1)
        if native is not None:  # compiled loop: one call per block, or per N:M group
            Hc = Hinv1.contiguous()
            step = count if pattern is None else pattern.m
            for i in range(0, count, step):
                if pattern is not None:
                    _select_group(W1, d1, mask1, scale, i, pattern)
                native(W1, Err1, Hc, scale, i, min(i + step, count), threads)
        else:
            for i in range(count):
                if pattern is not None and i % pattern.m == 0:
                    _select_group(W1, d1, mask1, scale, i, pattern)
                err1 = torch.mul(W1[i], scale[i], out=Err1[i])
                # OBS update of this and the block's later columns (column i itself becomes q)
                W1[i:].addmm_(Hinv1[i, i:].unsqueeze(1), err1.unsqueeze(0), alpha=-1)
        Wt[i1:i2] = W1
        pruned_t[i1:i2] = mask1
        if i2 < cols:  # lazy batch update of the remaining columns
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    W = Wt.t()
    pruned = pruned_t.t()
    keep = ~pruned
    W = torch.where(keep, W, torch.zeros((), dtype=W.dtype, device=W.device))
    return PruneOutput(W.to(weight.dtype), keep)


@dataclass
class SparseGPTOptions:
    """``percdamp``: dampening lambda as a fraction of mean(diag H) (paper/code 0.01);
    ``blocksize``: columns per lazy-update block B (paper/code 128). ``PruneConfig.percdamp`` and
    ``.blocksize`` are their older aliases. ``quant``: a quantization scheme (``int8``,
    ``int4-g128``, ``int4-g128-asym``, ...) to prune and quantize jointly in the same pass (paper
    Sec. 3.5); none (default) = plain SparseGPT."""

    CONFIG_ALIASES: ClassVar[dict[str, str]] = {"percdamp": "percdamp", "blocksize": "blocksize"}
    percdamp: float = 0.01
    blocksize: int = 128
    quant: Optional[str] = None

    def validate(self) -> None:
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ConfigError(f"blocksize must be an integer >= 1, got {self.blocksize!r}")
        if not 0 <= float(self.percdamp) < 10:
            raise ConfigError(f"percdamp (SparseGPT dampening, a fraction of mean(diag H)) must be in [0, 10), "
                              f"got {self.percdamp}")
        if self.quant is not None:
            from ..quant.gptq import check_blocksize
            from ..quant.scheme import QuantScheme

            check_blocksize(QuantScheme.parse(self.quant), self.blocksize)


@PRUNERS.register("sparsegpt")
@dataclass
class SparseGPTPruner:
    Options: ClassVar[type] = SparseGPTOptions
    options: SparseGPTOptions = field(default_factory=SparseGPTOptions)
    needs: frozenset = frozenset({"hessian"})
    # joint mode, per pruned layer: {"scheme", "scales", "zeros", "kept", "rounded_to_zero"} (the grid only,
    # not the codes: a checkpoint's side file; sparse_runtime.quant.apply.joint_quantization)
    quantized: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg) -> "SparseGPTPruner":
        return cls(config_options(cls, cfg))

    def check(self, pattern: Optional[NMPattern]) -> None:
        """Raise ConfigError before any work when the structure cannot work with these options."""
        if pattern is not None and self.options.blocksize % pattern.m:
            raise ConfigError(f"SparseGPT's blocksize {self.options.blocksize} must be a multiple of M={pattern.m} "
                              "so N:M groups do not straddle column blocks")

    def prune(self, task: LayerTask, sparsity: float, pattern: Optional[NMPattern]) -> PruneOutput:
        if task.stats.hessian is None:
            raise RuntimeError(f"SparseGPT needs the 'hessian' statistic for {task.name}; none was gathered")
        if self.options.quant is not None:
            from ..quant.gptq import obs_quantize
            from ..quant.scheme import QuantScheme
            from .base import fix_kept_zeros_

            qw = obs_quantize(task.linear.weight.data, task.stats.hessian, QuantScheme.parse(self.options.quant),
                              sparsity=sparsity, pattern=pattern, percdamp=float(self.options.percdamp),
                              blocksize=int(self.options.blocksize), name=task.name)
            self.quantized[task.name] = {"scheme": qw.scheme, "scales": qw.scales, "zeros": qw.zeros,
                                         "kept": int(qw.mask.sum()), "rounded_to_zero": qw.rounded_to_zero}
            w = qw.dequantize()
            fix_kept_zeros_(w, qw.mask)  # a kept weight that rounds to 0 stays in the mask (counted in qw)
            dev = task.linear.weight.device
            return PruneOutput(w.to(dev, task.linear.weight.dtype), qw.mask.to(dev))
        return sparsegpt_prune(task.linear.weight.data, task.stats.hessian, sparsity, pattern,
                               percdamp=float(self.options.percdamp), blocksize=int(self.options.blocksize),
                               name=task.name)
