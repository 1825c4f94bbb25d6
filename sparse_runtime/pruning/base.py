"""What every one-shot pruning method shares: the registries, the pruner and refiner contracts.

A *pruner* turns one linear (and the statistics of its calibration inputs gathered by the
sequential driver, :mod:`sparse_runtime.calibration`) into a pruned weight and a keep-mask at a
given sparsity and structure. It never writes the module itself: :mod:`sparse_runtime.prune` does,
after an optional *refiner* (e.g. DSnoT, docs/methods.md#dsnot) has changed the mask. Keeping "compute" and
"write" apart is what lets a refiner see the dense weight, the pruned weight and the mask together,
inside the same sequential pass (docs/methods.md#composition: DSnoT runs at the same point as Wanda).

Options belong to their method: a pruner class may declare ``Options``, a dataclass in the same file
(``SparseGPTOptions``: ``percdamp``, ``blocksize``), which is built from ``PruneConfig.method_options``
(``--method-option KEY=VALUE``, a recipe's ``method_options:``) and validated by
:func:`sparse_runtime.options.options_from_dict`; the pruner is then constructed as
``cls(options)`` (``cls()`` without ``Options``). See docs/architecture.md, "Adding a method".

Structure wording (see :mod:`sparse_runtime.sparsity`): ``N:M`` is N ZEROS in every M consecutive
input weights of a row (the papers' "prune N of M"); ``None`` is unstructured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import torch

from ..calibration import LayerTask
from ..registry import Registry
from ..sparsity import NMPattern

PRUNERS: Registry = Registry("pruning method")
REFINERS: Registry = Registry("mask refiner")


@dataclass
class PruneOutput:
    """A pruned weight (same shape and dtype as the input, zeros where pruned) and its keep-mask
    (True = the position may hold a nonzero). SparseGPT's weight also has updated kept values."""

    weight: torch.Tensor
    keep: torch.Tensor


@runtime_checkable
class Pruner(Protocol):
    """One pruning method, built from its options (see the module docstring).

    ``needs`` names the :class:`~sparse_runtime.calibration.InputStatistics` it reads
    (``"norm"``, ``"mean"``, ``"var"``, ``"hessian"``); an empty set means no calibration data at all.
    """

    needs: frozenset

    def prune(self, task: LayerTask, sparsity: float, pattern: Optional[NMPattern]) -> PruneOutput: ...


def build_method(cls: Any, options: Any) -> Any:
    """An instance of a registered pruner or allocator class: ``cls(options)`` when it declares
    ``Options``, else ``cls()``."""
    return cls(options) if getattr(cls, "Options", None) is not None else cls()


def config_options(cls: Any, cfg: Any) -> Any:
    """``cls``'s validated options from a :class:`~sparse_runtime.prune.PruneConfig` (its
    ``method_options`` and the older flat aliases), for ``from_config`` of the built-in pruners."""
    from ..prune import resolve_options

    return resolve_options(cls, cfg, "method")


@runtime_checkable
class MaskRefiner(Protocol):
    """Changes a freshly made mask inside the sequential pass (DSnoT registers one as ``"dsnot"``).

    ``refine`` returns the new weight tensor (same shape; zeros where pruned). It must keep each
    row's number of nonzeros (no more than ``pruned_weight`` had) and the N:M pattern, which
    :mod:`sparse_runtime.prune` checks after every call. ``needs`` are the extra input statistics
    it reads from ``task.stats``; they are merged into the driver's.
    """

    needs: frozenset

    def refine(self, task: LayerTask, dense_weight: torch.Tensor, pruned_weight: torch.Tensor,
               keep: torch.Tensor, pattern: Optional[NMPattern], sparsity: float) -> torch.Tensor: ...


def apply_keep(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``weight`` with zeros where ``keep`` is False, in the weight's own dtype."""
    return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
