"""OWL: outlier-weighed layer-wise sparsity (Yin et al., 2024; docs/methods.md#owl).

Pass 1 (no pruning, the same sequential driver): for block l, concatenate the Wanda scores
|W_ij| * ||X_j||_2 of all its selected linears into A_l and measure the layer outlier distribution

    LOD_l = 100 * |{a in A_l : a > M * mean(A_l)}| / |A_l|        (M = option ``m``, default 5)

(the official ``check_outlier_mean``: the MEAN, not the max). Then

    D_l = (LOD_l - min LOD) / (max LOD - min LOD) * 2 lambda      (lambda = option ``lam``, 0.08)
    D_l <- D_l - mean(D) + (1 - S);   s_l = 1 - D_l

so more outliers -> lower sparsity, densities lie in [1 - S - lambda, 1 - S + lambda], and the mean
sparsity is exactly S. Our ``mean`` is parameter-weighted (see :mod:`.base`), which equals the
paper's plain mean when blocks are the same size. The LOD always uses the Wanda score, whatever
method prunes in pass 2 (as the official code does). If every block has the same LOD the
allocation is uniform. Not implemented: OWL's per-layer-N N:M variant (an error, never ignored).

Checked against the official ``prune_wanda_outlier`` (tests/test_allocation.py re-computes it the
official way on a tiny model): same score, dense pass 1, per-block concatenation, strict ``>``,
[0, 2 lambda] spread. Its ``main.py`` argparse default is ``Hyper_m=3``; its README runs (and our
default) use 5, so match M when comparing against the official code (docs/methods.md#owl).

Options (:class:`OWLOptions`, ``allocation_options: {m: 5, lam: 0.08}``; the older flat
``owl_m``/``owl_lambda`` are aliases).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from ..errors import ConfigError
from ..pruning.wanda import wanda_score
from .base import ALLOCATIONS, Allocation, AllocationRequest, BlockLayout, clip_unit, weighted_mean


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """LOD in percent: share of scores above ``m`` times their mean."""
    scores = scores.reshape(-1).float()
    return 100.0 * float((scores > m * scores.mean()).sum().item()) / max(1, scores.numel())


def owl_rates(lod: Sequence[float], sparsity: float, lam: float, weights: Sequence[float] | None = None) -> list[float]:
    """Per-block sparsities from the outlier ratios (docs/methods.md#owl, "Allocation")."""
    weights = list(weights) if weights is not None else [1.0] * len(lod)
    lo, hi = min(lod), max(lod)
    if hi - lo <= 0:
        d = [0.0] * len(lod)
    else:
        d = [(x - lo) / (hi - lo) * 2 * lam for x in lod]
    mean_d = weighted_mean(d, weights)
    density = [x - mean_d + (1 - sparsity) for x in d]
    return clip_unit([1 - x for x in density])


@dataclass
class OWLOptions:
    """``m``: the outlier threshold M, a multiple of the mean score (paper 5); ``lam``: lambda, the
    half-width of the per-block sparsities around S (paper 0.08)."""

    CONFIG_ALIASES: ClassVar[dict[str, str]] = {"owl_m": "m", "owl_lambda": "lam"}
    m: float = 5.0
    lam: float = 0.08

    def validate(self) -> None:
        if not self.m > 0:
            raise ConfigError(f"OWL m (owl_m, the outlier threshold M, a multiple of the mean score) must be > 0, "
                              f"got {self.m}")
        if not self.lam >= 0:
            raise ConfigError(f"OWL lam (owl_lambda) must be >= 0, got {self.lam}")


@ALLOCATIONS.register("owl")
@dataclass
class OWLAllocator:
    Options: ClassVar[type] = OWLOptions
    options: OWLOptions = field(default_factory=OWLOptions)
    needs_calibration: bool = True

    def check(self, sparsity: float, layout: BlockLayout, cfg) -> None:
        o = self.options
        o.validate()
        if not 0 <= o.lam <= min(sparsity, 1 - sparsity):
            raise ConfigError(
                f"OWL lam (owl_lambda)={o.lam} is out of range for sparsity {sparsity}: per-layer sparsities span "
                f"S +- lambda, so lambda must be in [0, min(S, 1-S)] = [0, {min(sparsity, 1 - sparsity):.4g}]")

    def allocate(self, req: AllocationRequest) -> Allocation:
        o = self.options
        pending: dict[int, list[torch.Tensor]] = {}
        lod: dict[int, float] = {}

        def finish(block: int) -> None:
            lod[block] = outlier_ratio(torch.cat(pending.pop(block)), o.m)

        def on_layer(task) -> None:
            for b in [b for b in pending if b != task.block_index]:
                finish(b)
            pending.setdefault(task.block_index, []).append(
                wanda_score(task.linear.weight.data, task.stats.norm).reshape(-1).cpu())

        req.stats_pass(on_layer, frozenset({"norm"}))
        for b in list(pending):
            finish(b)
        lods = [lod[b] for b in req.layout.blocks]
        rates = owl_rates(lods, req.sparsity, o.lam, req.layout.weights)
        if any(not 0 <= r <= 1 for r in rates):
            raise ConfigError(f"OWL gave sparsities outside [0, 1] ({min(rates):.3f}..{max(rates):.3f}); lower lam (owl_lambda)")
        return Allocation(rates, {"lod": lods, "owl_m": o.m, "owl_lambda": o.lam})
