"""One-shot pruning methods, one small module each, behind the :data:`PRUNERS` registry.

``magnitude`` (per-matrix |W|), ``wanda`` (|W| * ||X_j||, per output row), ``sparsegpt`` (OBS with
weight reconstruction). Mask refiners (DSnoT) register in :data:`REFINERS`. The public verb is
:func:`sparse_runtime.prune.prune_model`.
"""
from .base import PRUNERS, REFINERS, MaskRefiner, PruneOutput, Pruner, apply_keep
from . import magnitude, sparsegpt, wanda  # noqa: F401  (registration)
from .magnitude import magnitude_mask
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_mask, wanda_score

__all__ = ["PRUNERS", "REFINERS", "MaskRefiner", "PruneOutput", "Pruner", "apply_keep", "magnitude_mask",
           "sparsegpt_prune", "wanda_mask", "wanda_score"]
