"""RMI: layer-wise sparsity from representation mutual information and a linear program, the
allocation of LoSA (Huang et al., ICLR 2025; docs/methods.md#losa-round-loop steps 4-5).

**Importance.** The paper follows ITPruner / RMI-NAS (Zheng et al.): the mutual information between
two layers' representations is estimated by the normalised HSIC with a linear kernel,

    RMI(X_a, X_b) = ||X_b^T X_a||_F^2 / (||X_a^T X_a||_F ||X_b^T X_b||_F)

over centred features, i.e. linear CKA. Written with the n x n Gram matrices K = X X^T of the n
calibration samples (each flattened to one vector of seqlen * d), and H = I - 11^T/n,

    CKA(K_a, K_b) = <H K_a H, H K_b H>_F / (||H K_a H||_F ||H K_b H||_F)

which is exactly the official ``CKA/cka.py`` (``unbiased=False``). Only the Gram matrices are kept
(n x n per block), never the features, so memory is bounded by the sequential driver's one block.
m_l = sum_{b != l} C_lb, normalised to sum to 1 (how redundant block l is with the others), and
I_l = exp(-beta m_l). Because the LP below is linear with box constraints, only the ORDER of I
matters, and exp(-beta m) is monotone in m: beta (1 for Wanda, 100 for SparseGPT in the code)
changes nothing in the allocation; it is kept for the record.

Which features: ``"outputs"`` (default, our reading of the paper: each block's representation is
what it produces) or ``"inputs"`` (the official code: each block's INPUT, so block 0's importance is
measured on the embeddings; docs/methods.md#losa-surprises item 3).

**Allocation** (the paper's Eq. 5):

    min_x  sum_l I_l x_l   s.t.  mean_w(x) = S,   max(0, S - delta) <= x_l <= min(S + delta, 1)

with mean_w the parameter-weighted mean over blocks (the plain mean when blocks are the same size,
as in the paper; see :mod:`.base`). This is a fractional knapsack, so it is solved EXACTLY by a
greedy pass instead of the official SLSQP: start every block at its lower bound, then hand the
remaining budget to the blocks with the lowest cost per unit of weighted sparsity (I_l / w_l) first,
each up to its upper bound. The solution is the LP optimum: "bang-bang", as the official one (the
less important half at S + delta, the rest at S - delta, at most one block in between), but with the
mean exactly S (to float rounding, then a final correction on the in-between block) and no negative
rates. Ties in importance go to the later block first (a stable, deterministic order that also
matches ATP's argument that later blocks tolerate more sparsity).

**Half-width** delta(S) of the box. The official table is

    S <= 0.5: 0.01    S <= 0.6: 0.02    S <= 0.7: 0.03    above: undefined (the code crashes)

We keep it where it is defined and extend the same staircase (+0.01 per 0.1 of sparsity) above:
(0.7, 0.8] -> 0.04, (0.8, 0.9] -> 0.05, (0.9, 1) -> 0.06; then cap it so the box stays inside
[0, 1): delta <= S (no negative rate) and delta <= (1 - S) / 2 (no block at or above (1 + S) / 2,
which keeps every block strictly below 1). This is defined for every S in [0, 1).

Options (:class:`RMIOptions`, ``allocation_options: {delta: 0.02, features: inputs, samples: 64}``).
The Gram matrices need the model run block by block WITHOUT pruning: the request's ``block_pass``
(LoSA supplies it every round, on the merged model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

import torch

from ..errors import ConfigError
from .base import ALLOCATIONS, Allocation, AllocationRequest, BlockLayout

FEATURES = ("outputs", "inputs")


# -- RMI: linear CKA from Gram matrices --------------------------------------------------------------
def gram(features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """K = X X^T (fp64) with X the samples flattened: [n, ...] or a list of [b, ...] mini-batches."""
    if isinstance(features, torch.Tensor):
        features = [features]
    X = torch.cat([f.detach().reshape(f.shape[0], -1).double() for f in features], 0)
    return X @ X.t()


def center(K: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/n."""
    K = K.double()
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def cka(Ka: torch.Tensor, Kb: torch.Tensor) -> float:
    """Linear CKA from two Gram matrices (biased HSIC, as the official code)."""
    A, B = center(Ka), center(Kb)
    den = float(A.norm() * B.norm())
    return float((A * B).sum()) / den if den > 0 else 0.0


def cka_matrix(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """C_ab = CKA(K_a, K_b) for all pairs (symmetric, ones on the diagonal where defined)."""
    cen = [center(K) for K in grams]
    norms = [float(c.norm()) for c in cen]
    L = len(cen)
    C = torch.zeros(L, L, dtype=torch.float64)
    for a in range(L):
        for b in range(a, L):
            den = norms[a] * norms[b]
            v = float((cen[a] * cen[b]).sum()) / den if den > 0 else 0.0
            C[a, b] = C[b, a] = v
    return C


def rmi_importance(C: torch.Tensor, beta: float = 1.0) -> tuple[list[float], list[float]]:
    """(importance I_l, redundancy m_l) from the similarity matrix ``C``."""
    C = C.double()
    L = C.shape[0]
    m = C.sum(1) - C.diagonal()
    tot = float(m.sum())
    m = m / tot if tot > 0 else torch.full((L,), 1.0 / max(1, L), dtype=torch.float64)
    imp = torch.exp(-float(beta) * m)
    return [float(v) for v in imp], [float(v) for v in m]


class GramCollector:
    """``on_block_end`` callback for :func:`~sparse_runtime.calibration.sequential_pass`: keeps the
    n x n Gram matrix of each block's inputs or outputs, and nothing else."""

    def __init__(self, features: str = "outputs") -> None:
        if features not in FEATURES:
            raise ConfigError(f"rmi_features must be one of {FEATURES}, got {features!r}")
        self.features = features
        self.grams: dict[int, torch.Tensor] = {}

    def __call__(self, bi: int, block, inputs, outs) -> None:
        src = inputs.hidden if self.features == "inputs" else outs
        self.grams[bi] = gram(src).cpu()


# -- the LP and its half-width -------------------------------------------------------------------------
def delta_for(s_t: float) -> float:
    """The LP's half-width for the target ``s_t`` (see the module docstring)."""
    s = float(s_t)
    if not 0.0 <= s < 1.0:
        raise ConfigError(f"round sparsity {s} is outside [0, 1)")
    if s <= 0.5:
        d = 0.01
    else:
        d = 0.01 + 0.01 * math.ceil(round((s - 0.5) / 0.1, 9))
        d = min(d, 0.06)
    return max(0.0, min(d, s, (1.0 - s) / 2.0))


def lp_allocate(importance: Sequence[float], s_t: float, delta: float,
                weights: Optional[Sequence[float]] = None) -> list[float]:
    """The exact solution of the LP (see the module docstring), one rate per block."""
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


# -- the registered allocator --------------------------------------------------------------------------
@dataclass
class RMIOptions:
    """``delta``: the LP half-width (None: :func:`delta_for` of the target; a given value is capped to
    [0, min(S, (1 - S) / 2)]); ``features``: ``outputs`` (paper reading) or ``inputs`` (official
    code); ``samples``: calibration samples for the Gram matrices (official 64); ``beta``: the
    importance temperature (None: 100 for SparseGPT, else 1, as the code; no effect on the LP)."""

    delta: Optional[float] = None
    features: str = "outputs"
    samples: int = 64
    beta: Optional[float] = None

    def validate(self) -> None:
        if self.delta is not None and not 0.0 <= float(self.delta) < 1.0:
            raise ConfigError(f"RMI delta must be in [0, 1), got {self.delta}")
        if self.features not in FEATURES:
            raise ConfigError(f"RMI features (rmi_features) must be one of {FEATURES}, got {self.features!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2:
            raise ConfigError(f"RMI (CKA over samples) needs samples (rmi_samples) >= 2, got {self.samples!r}")
        if self.beta is not None and not float(self.beta) > 0:
            raise ConfigError(f"RMI beta must be > 0, got {self.beta}")


@ALLOCATIONS.register("rmi")
@dataclass
class RMIAllocator:
    Options: ClassVar[type] = RMIOptions
    options: RMIOptions = field(default_factory=RMIOptions)
    needs_calibration: bool = True

    def check(self, sparsity: float, layout: BlockLayout, cfg) -> None:
        self.options.validate()

    def beta(self, cfg) -> float:
        if self.options.beta is not None:
            return float(self.options.beta)
        return 100.0 if str(getattr(cfg, "method", "")).lower() == "sparsegpt" else 1.0

    def half_width(self, s: float) -> float:
        d = self.options.delta
        return delta_for(s) if d is None else max(0.0, min(float(d), s, (1.0 - s) / 2.0))

    def allocate(self, req: AllocationRequest) -> Allocation:
        if req.block_pass is None:
            raise ConfigError("allocation 'rmi' needs a block-by-block pass over the calibration data, which this "
                              "caller does not provide; use it through LoSA (finetune --method losa --allocation rmi)")
        col = GramCollector(self.options.features)
        req.block_pass(col, self.options.samples)
        imp, m = rmi_importance(cka_matrix([col.grams[b] for b in req.layout.blocks]), self.beta(req.cfg))
        delta = self.half_width(req.sparsity)
        rates = lp_allocate(imp, req.sparsity, delta, req.layout.weights)
        return Allocation(rates, {"importance": imp, "redundancy": m, "delta": delta})
