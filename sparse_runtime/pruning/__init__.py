"""One-shot pruning methods, one small module each, behind the :data:`PRUNERS` registry.

``magnitude`` (per-matrix |W|), ``wanda`` (|W| * ||X_j||, per output row), ``sparsegpt`` (OBS with
weight reconstruction), each with its own ``Options`` dataclass. Mask refiners (DSnoT) register in :data:`REFINERS`. The public verb is
:func:`sparse_runtime.prune.prune_model`.
"""
from .base import PRUNERS, REFINERS, MaskRefiner, PruneOutput, Pruner, apply_keep, build_method
from . import magnitude, sparsegpt, wanda  # noqa: F401  (registration)
from ..registry import import_submodules

import_submodules(__name__, __path__)  # a new method's file here registers itself: nothing to add
from .magnitude import MagnitudeOptions, magnitude_mask
from .sparsegpt import SparseGPTOptions, sparsegpt_prune
from .wanda import WandaOptions, wanda_mask, wanda_score

__all__ = ["PRUNERS", "REFINERS", "MaskRefiner", "PruneOutput", "Pruner", "apply_keep", "build_method",
           "MagnitudeOptions", "SparseGPTOptions", "WandaOptions", "magnitude_mask", "sparsegpt_prune", "wanda_mask",
           "wanda_score"]
