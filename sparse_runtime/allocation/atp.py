"""ATP: arithmetic-progression layer-wise sparsity (Huang et al., ICML 2025; methods.md 4).

Eq. 10, blocks i = 1..L:   s_i = S - beta (L - 1)/2 + beta (i - 1)

a monotonically increasing schedule (Thm 3.5: with accumulating reconstruction error, increasing
schedules are optimal) whose mean is S. All linears of a block share s_i. Valid range:

    0 < beta <= min(2S/(L-1), 2(1-S)/(L-1))

(the bound itself is allowed, as in the official code: it gives s_1 = 0 or s_L = 1). We write the
schedule as s_i = S + beta (i - i_bar) with i_bar the parameter-weighted mean block index, which is
Eq. 10 exactly when blocks have the same size and keeps the weighted mean exactly S otherwise; the
bound becomes min(S / i_bar, (1-S) / (L-1-i_bar)) (0-based i).

Beta search (``atp_beta="auto"``): the paper picks beta from a grid (0.002, 0.004, ... up to the
bound) by WikiText-2 perplexity, and the released ``eval_ppl`` uses the TEST split, i.e. beta is
tuned on the data the paper reports. We never do that: each candidate is scored on HELD-OUT data
(default: WikiText-2 *validation*, a few windows; or fresh C4 windows with a seed other than the
calibration seed), see :func:`sparse_runtime.prune.heldout_ids`. To keep it cheap the default grid
is ``atp_candidates`` evenly spaced fractions k/(K+1) of the bound (K = 4); ``atp_step`` gives the
paper's fixed-step grid instead (0.002 in ``search.sh``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import ConfigError
from .base import ALLOCATIONS, Allocation, AllocationRequest, BlockLayout, clip_unit

_TOL = 1e-12


def _ibar(weights: Sequence[float]) -> float:
    total = float(sum(weights))
    return sum(i * w for i, w in enumerate(weights)) / total


def atp_beta_max(sparsity: float, weights: Sequence[float]) -> float:
    """Largest legal beta: min(2S/(L-1), 2(1-S)/(L-1)) for equal-size blocks."""
    L = len(weights)
    if L < 2:
        return 0.0
    ib = _ibar(weights)
    return min(sparsity / ib, (1 - sparsity) / (L - 1 - ib))


def atp_rates(sparsity: float, beta: float, weights: Optional[Sequence[float]] = None, L: Optional[int] = None) -> list[float]:
    """Per-block sparsities of Eq. 10 (weighted form, see the module docstring)."""
    weights = list(weights) if weights is not None else [1.0] * int(L or 0)
    ib = _ibar(weights)
    return clip_unit([sparsity + beta * (i - ib) for i in range(len(weights))])


def check_beta(beta: float, sparsity: float, weights: Sequence[float]) -> None:
    L = len(weights)
    bmax = atp_beta_max(sparsity, weights)
    if L < 2:
        raise ConfigError("ATP needs at least 2 blocks with selected layers; use allocation='uniform'")
    if not (beta > 0 and beta <= bmax + _TOL):
        raise ConfigError(
            f"ATP beta={beta} is out of range: it must satisfy 0 < beta <= min(2S/(L-1), 2(1-S)/(L-1)) = "
            f"{bmax:.6g} for S={sparsity} and L={L} blocks (larger values push a layer's sparsity outside "
            f"[0, 1]); pick a smaller beta or atp_beta='auto'")


def beta_candidates(bmax: float, n: int = 4, step: Optional[float] = None) -> list[float]:
    if step:
        out, k = [], 1
        while k * step <= bmax + _TOL:
            out.append(round(k * step, 12))
            k += 1
        return out
    return [bmax * k / (n + 1) for k in range(1, n + 1)]


@ALLOCATIONS.register("atp")
@dataclass
class ATPAllocator:
    needs_calibration: bool = False

    def check(self, sparsity: float, layout: BlockLayout, cfg) -> None:
        if isinstance(cfg.atp_beta, str):
            if cfg.atp_beta != "auto":
                raise ConfigError(f"atp_beta must be a number or 'auto', got {cfg.atp_beta!r}")
            if len(layout.blocks) < 2:
                raise ConfigError("ATP needs at least 2 blocks with selected layers; use allocation='uniform'")
            if sparsity <= 0:
                raise ConfigError("ATP with sparsity 0 has no legal beta (0 < beta <= 2S/(L-1)); use allocation='uniform'")
            if not beta_candidates(atp_beta_max(sparsity, layout.weights), cfg.atp_candidates, cfg.atp_step):
                raise ConfigError(f"atp_step={cfg.atp_step} exceeds the largest legal beta "
                                  f"{atp_beta_max(sparsity, layout.weights):.6g}; use a smaller step")
        else:
            check_beta(float(cfg.atp_beta), sparsity, layout.weights)

    def allocate(self, req: AllocationRequest) -> Allocation:
        cfg, w, S = req.cfg, req.layout.weights, req.sparsity
        bmax = atp_beta_max(S, w)
        if not isinstance(cfg.atp_beta, str):
            beta = float(cfg.atp_beta)
            return Allocation(atp_rates(S, beta, w), {"beta": beta, "beta_max": bmax, "search": None})
        scores = {}
        for beta in beta_candidates(bmax, cfg.atp_candidates, cfg.atp_step):
            scores[beta] = float(req.trial(atp_rates(S, beta, w)))
        best = min(scores, key=lambda b: (scores[b], b))
        return Allocation(atp_rates(S, best, w), {
            "beta": best, "beta_max": bmax,
            "search": {"heldout": cfg.atp_heldout, "windows": cfg.atp_heldout_windows,
                       "scores": {f"{b:.6g}": s for b, s in scores.items()}}})
