"""LoSA's layer-wise sparsity linear program (the paper's Eq. 5; docs/methods.md#losa-round-loop step 5):

    min_x  sum_l I_l x_l   s.t.  mean_w(x) = s_t,   max(0, s_t - delta) <= x_l <= min(s_t + delta, 1)

with I_l the RMI importance and mean_w the parameter-weighted mean over blocks (the plain mean when
blocks are the same size, as in the paper; see :mod:`sparse_runtime.allocation.base`).

This is a fractional knapsack, so it is solved EXACTLY by a greedy pass instead of the official
SLSQP: start every layer at its lower bound, then hand the remaining budget to the layers with the
lowest cost per unit of weighted sparsity (I_l / w_l) first, each up to its upper bound. The
solution is the LP optimum: "bang-bang", as the official one (the less important half at
s_t + delta, the rest at s_t - delta, at most one layer in between), but with the mean exactly s_t
(to float rounding, then a final correction on the in-between layer) and no negative rates.
Ties in importance go to the later block first (a stable, deterministic order that also matches
ATP's argument that later blocks tolerate more sparsity).
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..errors import ConfigError


def lp_allocate(importance: Sequence[float], s_t: float, delta: float,
                weights: Optional[Sequence[float]] = None) -> list[float]:
    L = len(importance)
    if L == 0:
        raise ConfigError("no layers to allocate")
    if not 0.0 <= s_t < 1.0:
        raise ConfigError(f"round sparsity {s_t} is outside [0, 1)")
    if delta < 0:
        raise ConfigError(f"delta must be >= 0, got {delta}")
    w = [float(x) for x in (weights if weights is not None else [1.0] * L)]
    if len(w) != L or any(x <= 0 for x in w):
        raise ConfigError("weights must be positive, one per layer")
    W = sum(w)
    lo = max(0.0, s_t - delta)
    hi = min(1.0, s_t + delta)
    x = [lo] * L
    budget = (s_t - lo) * W  # weighted sparsity still to place
    order = sorted(range(L), key=lambda l: (importance[l] / w[l], -l))
    last = None
    for l in order:
        if budget <= 0:
            break
        give = min(hi - lo, budget / w[l])
        x[l] = lo + give
        budget -= give * w[l]
        last = l
    # fix float residue on the in-between (or last filled) layer so the weighted mean is s_t
    if last is not None:
        resid = s_t * W - sum(xi * wi for xi, wi in zip(x, w))
        x[last] = min(hi, max(lo, x[last] + resid / w[last]))
    return x


def weighted_mean(x: Sequence[float], weights: Optional[Sequence[float]] = None) -> float:
    w = list(weights) if weights is not None else [1.0] * len(x)
    return sum(a * b for a, b in zip(x, w)) / sum(w)
