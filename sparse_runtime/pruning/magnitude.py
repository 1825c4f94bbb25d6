"""Magnitude pruning: the papers' baseline (docs/methods.md#magnitude).

Score S_ij = |W_ij|. Unstructured: one threshold per MATRIX (Wanda's ``prune_magnitude`` sorts all
|W| of the layer and zeros the floor(numel * s) smallest), so rows end up with different counts;
``per_row=True`` zeros floor(C_in * s) per output row instead (an option, not the papers' baseline).
N:M: the N smallest |W| in every group of M consecutive inputs of every row.

Needs no calibration data: magnitude runs without the sequential driver unless a refiner or an
allocation needs input statistics.

Deviation: the official code zeros every entry ``<=`` the threshold, which prunes more than
floor(numel * s) on ties; we break ties with a stable sort so the count is exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from ..calibration import LayerTask
from ..sparsity import NMPattern, nm_prune_mask, topk_prune_mask
from .base import PRUNERS, PruneOutput, apply_keep, config_options


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Optional[NMPattern] = None,
                   per_row: bool = False) -> torch.Tensor:
    """Keep-mask (True = kept) of magnitude pruning on a plain tensor."""
    score = weight.detach().float().abs()
    if pattern is not None:
        return nm_prune_mask(score, pattern)
    return topk_prune_mask(score, sparsity, per_row=per_row)


@dataclass
class MagnitudeOptions:
    """``per_row``: zero floor(C_in * s) per output row instead of one threshold per matrix (not
    the papers' baseline). ``PruneConfig.per_row`` is its older alias."""

    CONFIG_ALIASES: ClassVar[dict[str, str]] = {"per_row": "per_row"}
    per_row: bool = False


@PRUNERS.register("magnitude")
@dataclass
class MagnitudePruner:
    Options: ClassVar[type] = MagnitudeOptions
    options: MagnitudeOptions = field(default_factory=MagnitudeOptions)
    needs: frozenset = frozenset()

    @classmethod
    def from_config(cls, cfg) -> "MagnitudePruner":
        return cls(config_options(cls, cfg))

    def prune(self, task: LayerTask, sparsity: float, pattern: Optional[NMPattern]) -> PruneOutput:
        w = task.linear.weight.data
        keep = magnitude_mask(w, sparsity, pattern, self.options.per_row)
        return PruneOutput(apply_keep(w, keep), keep)
