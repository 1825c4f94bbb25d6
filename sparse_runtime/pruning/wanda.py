"""Wanda: pruning by weights and activations (Sun et al., 2024; docs/methods.md#wanda).

Score (paper Eq. 1): S_ij = |W_ij| * ||X_j||_2, where ||X_j||_2^2 is the driver's ``sq_sum``
(Wanda's ``scaler_row``: (1/N) sum_n sum_t x_{n,t,j}^2; the constant 1/N does not change the
ranking). Comparison group: each OUTPUT ROW (paper Sec. 3, "per output"): every row loses exactly
floor(C_in * s) weights, which is why Wanda's per-row sparsity is exact. N:M: the N lowest scores
in every group of M consecutive inputs of each row.

Not implemented: the ``--use_variant`` alpha bisection (off by default in the official code).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from ..calibration import LayerTask
from ..sparsity import NMPattern, nm_prune_mask, topk_prune_mask
from .base import PRUNERS, PruneOutput, apply_keep, config_options


def wanda_score(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2 broadcast over rows (fp32)."""
    return weight.detach().float().abs() * norm.to(weight.device).float().reshape(1, -1)


def wanda_mask(weight: torch.Tensor, norm: torch.Tensor, sparsity: float,
               pattern: Optional[NMPattern] = None) -> torch.Tensor:
    """Keep-mask (True = kept) of Wanda on a plain tensor; ``norm`` is ||X_j||_2 per input channel."""
    score = wanda_score(weight, norm)
    if pattern is not None:
        return nm_prune_mask(score, pattern)
    return topk_prune_mask(score, sparsity, per_row=True)


@dataclass
class WandaOptions:
    """Wanda has no options of its own (its comparison group and score are the paper's)."""


@PRUNERS.register("wanda")
@dataclass
class WandaPruner:
    Options: ClassVar[type] = WandaOptions
    options: WandaOptions = field(default_factory=WandaOptions)
    needs: frozenset = frozenset({"norm"})

    @classmethod
    def from_config(cls, cfg) -> "WandaPruner":
        return cls(config_options(cls, cfg))

    def prune(self, task: LayerTask, sparsity: float, pattern: Optional[NMPattern]) -> PruneOutput:
        w = task.linear.weight.data
        keep = wanda_mask(w, task.stats.norm, sparsity, pattern)
        return PruneOutput(apply_keep(w, keep), keep)
