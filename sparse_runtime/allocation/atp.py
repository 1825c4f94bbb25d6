"""ATP: arithmetic-progression layer-wise sparsity (Huang et al., ICML 2025; docs/methods.md#atp).

Eq. 10, blocks i = 1..L:   s_i = S - beta (L - 1)/2 + beta (i - 1)

a monotonically increasing schedule (Thm 3.5: with accumulating reconstruction error, increasing
schedules are optimal) whose mean is S. All linears of a block share s_i. Valid range:

    0 < beta <= min(2S/(L-1), 2(1-S)/(L-1))

(the bound itself is allowed, as in the official code: it gives s_1 = 0 or s_L = 1). We write the
schedule as s_i = S + beta (i - i_bar) with i_bar the parameter-weighted mean block index, which is
Eq. 10 exactly when blocks have the same size and keeps the weighted mean exactly S otherwise; the
bound becomes min(S / i_bar, (1-S) / (L-1-i_bar)) (0-based i).

Options (:class:`ATPOptions`, ``allocation_options: {beta: auto, candidates: 4, ...}``; the older
flat ``atp_beta``, ``atp_candidates``, ``atp_step``, ``atp_heldout``, ``atp_heldout_windows`` are
aliases).

Beta search (``beta="auto"``): the paper picks beta from a grid (0.002, 0.004, ... up to the
bound) by WikiText-2 perplexity, and the released ``eval_ppl`` uses the TEST split, i.e. beta is
tuned on the data the paper reports. We never do that: each candidate is scored on HELD-OUT data
(default: WikiText-2 *validation*, a few windows; or fresh C4 windows with a seed other than the
calibration seed), see :func:`sparse_runtime.prune.heldout_ids`. To keep it cheap the default grid
is ``candidates`` evenly spaced fractions k/(K+1) of the bound (K = 4); ``step`` gives the
paper's fixed-step grid instead (0.002 in ``search.sh``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence, Union

from ..errors import ConfigError
from .base import ALLOCATIONS, Allocation, AllocationRequest, BlockLayout, clip_unit

log = logging.getLogger(__name__)

_TOL = 1e-12
HELDOUT_SETS = ("wikitext2-valid", "c4")


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


@dataclass
class ATPOptions:
    """``beta``: a number in (0, min(2S/(L-1), 2(1-S)/(L-1))] or ``"auto"`` (the held-out search);
    ``candidates``: how many evenly spaced betas the search tries; ``step``: the paper's fixed-step
    grid instead; ``heldout``: the search's data (``wikitext2-valid`` or ``c4``, never a test set);
    ``heldout_windows``: how many windows of it."""

    CONFIG_ALIASES: ClassVar[dict[str, str]] = {
        "atp_beta": "beta", "atp_candidates": "candidates", "atp_step": "step", "atp_heldout": "heldout",
        "atp_heldout_windows": "heldout_windows"}
    beta: Union[float, str] = "auto"
    candidates: int = 4
    step: Optional[float] = None
    heldout: str = "wikitext2-valid"
    heldout_windows: int = 16

    def validate(self) -> None:
        if isinstance(self.beta, str):
            if self.beta.strip().lower() == "auto":
                self.beta = "auto"
            else:
                try:
                    self.beta = float(self.beta)
                except ValueError:
                    raise ConfigError(f"ATP beta (atp_beta) must be a positive number or 'auto', got {self.beta!r}") from None
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float, str)):
            raise ConfigError(f"ATP beta (atp_beta) must be a positive number or 'auto', got {self.beta!r}")
        if not isinstance(self.beta, str) and not float(self.beta) > 0:
            raise ConfigError(f"ATP beta={self.beta} is out of range: it must be > 0 (and at most "
                              "min(2S/(L-1), 2(1-S)/(L-1)))")
        for name, v in (("candidates", self.candidates), ("heldout_windows", self.heldout_windows)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"ATP {name} (atp_{name}) must be an integer >= 1, got {v!r}")
        if self.step is not None and not self.step > 0:
            raise ConfigError(f"ATP step (atp_step) must be > 0, got {self.step}")
        if self.heldout not in HELDOUT_SETS:
            raise ConfigError(f"ATP heldout (atp_heldout) must be one of {', '.join(HELDOUT_SETS)} (never the test "
                              f"set), got {self.heldout!r}")


@ALLOCATIONS.register("atp")
@dataclass
class ATPAllocator:
    Options: ClassVar[type] = ATPOptions
    options: ATPOptions = field(default_factory=ATPOptions)
    needs_calibration: bool = False

    def check(self, sparsity: float, layout: BlockLayout, cfg) -> None:
        o = self.options
        o.validate()
        if isinstance(o.beta, str):
            if len(layout.blocks) < 2:
                raise ConfigError("ATP needs at least 2 blocks with selected layers; use allocation='uniform'")
            if sparsity <= 0:
                raise ConfigError("ATP with sparsity 0 has no legal beta (0 < beta <= 2S/(L-1)); use allocation='uniform'")
            if not beta_candidates(atp_beta_max(sparsity, layout.weights), o.candidates, o.step):
                raise ConfigError(f"ATP step (atp_step)={o.step} exceeds the largest legal beta "
                                  f"{atp_beta_max(sparsity, layout.weights):.6g}; use a smaller step")
        else:
            check_beta(float(o.beta), sparsity, layout.weights)

    def allocate(self, req: AllocationRequest) -> Allocation:
        o, w, S = self.options, req.layout.weights, req.sparsity
        bmax = atp_beta_max(S, w)
        if not isinstance(o.beta, str):
            beta = float(o.beta)
            return Allocation(atp_rates(S, beta, w), {"beta": beta, "beta_max": bmax, "search": None})
        from ..progress import phase

        scores = {}
        cands = beta_candidates(bmax, o.candidates, o.step)
        log.info("ATP beta search: %d candidates in (0, %.4g], each a full prune scored by held-out perplexity",
                 len(cands), bmax)
        for i, beta in enumerate(cands, 1):
            with phase(f"ATP beta search: candidate {i}/{len(cands)}, beta={beta:.4g}"):
                scores[beta] = float(req.trial(atp_rates(S, beta, w)))
            log.info("ATP beta search: candidate %d/%d, beta=%.4g: held-out ppl %.2f", i, len(cands), beta, scores[beta])
        best = min(scores, key=lambda b: (scores[b], b))
        return Allocation(atp_rates(S, best, w), {
            "beta": best, "beta_max": bmax,
            "search": {"heldout": o.heldout, "windows": o.heldout_windows,
                       "scores": {f"{b:.6g}": s for b, s in scores.items()}}})
