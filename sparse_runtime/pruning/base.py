"""What every one-shot pruning method shares: the registries, the pruner and refiner contracts.

A *pruner* turns one linear (and the statistics of its calibration inputs gathered by the
sequential driver, :mod:`sparse_runtime.calibration`) into a pruned weight and a keep-mask at a
given sparsity and structure. It never writes the module itself: :func:`prune_layer` does (the one
per-layer step, shared by :mod:`sparse_runtime.prune` and LoSA's re-prune), after an optional
*refiner* (e.g. DSnoT, docs/methods.md#dsnot) has changed the mask. Keeping "compute" and "write" apart is what lets a refiner see the dense weight, the pruned weight and the mask together,
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
from ..errors import SparseRuntimeError
from ..registry import Registry
from ..sparsity import NMPattern, nm_compliant

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
    it reads from ``task.stats``; they are merged into the driver's. Optionally it has
    ``on_block_end(i, block, inputs, outputs)``, which the pass calls after each block is pruned and
    before the caller's own hook (DSnoT's block guard, ``docs/dsnot.md#the-block-guard``);
    ``check_run(streamed=, allocation=)``, called before any work to refuse a pass it cannot serve;
    ``on_pass_end(model, tokenizer, seqlen=, seed=, data_dir=)``, called after the last block of
    an in-memory pass (DSnoT's held-out acceptance, ``docs/dsnot.md#held-out-acceptance``); and a
    true ``wants_baseline_pass``, which makes the prune API run the pruner's own pass first (from the
    same dense weights, without the refiner) and hand ``baseline=(weights, snapshot, restore)`` to
    ``on_pass_end`` (DSnoT's ``accept=compare``, ``docs/dsnot.md#compare-against-the-pruners-own-pass``).
    """

    needs: frozenset

    def refine(self, task: LayerTask, dense_weight: torch.Tensor, pruned_weight: torch.Tensor,
               keep: torch.Tensor, pattern: Optional[NMPattern], sparsity: float) -> torch.Tensor: ...


def apply_keep(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``weight`` with zeros where ``keep`` is False, in the weight's own dtype."""
    return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def check_refined(name: str, before_keep: torch.Tensor, new: torch.Tensor, ref: torch.Tensor,
                  pattern: Optional[NMPattern]) -> None:
    """A refiner's weight must have the pruned weight's shape, no row denser than the pruner's mask
    and the N:M pattern: refiners change WHICH weights are kept, never how many."""
    if new.shape != ref.shape:
        raise SparseRuntimeError(f"the refiner returned shape {tuple(new.shape)} for {name}, expected {tuple(ref.shape)}")
    over = (new != 0).sum(1) > before_keep.sum(1)
    if bool(over.any()):
        raise SparseRuntimeError(f"the refiner made rows of {name} denser than the mask allows "
                                 f"({int(over.sum())} rows): refiners must keep each row's count")
    if pattern is not None and not nm_compliant(new, pattern):
        raise SparseRuntimeError(f"the refiner broke the {pattern} pattern of {name}")


def refined_keep(new: torch.Tensor, pruner_keep: torch.Tensor) -> torch.Tensor:
    """The refiner's keep set with each row's count equal to the pruner's: its nonzeros, topped up
    (where a kept weight is exactly zero, e.g. one pruned in an earlier LoSA round and now allowed
    back by a lower rate) from the pruner's keep set, then from any position, in column order."""
    keep = new != 0
    want = pruner_keep.sum(1, keepdim=True)
    for pool in (pruner_keep, torch.ones_like(pruner_keep)):
        deficit = want - keep.sum(1, keepdim=True)
        if not bool((deficit > 0).any()):
            break
        cand = pool & ~keep
        keep = keep | (cand & (cand.cumsum(1) <= deficit))
    return keep


def fix_kept_zeros_(w: torch.Tensor, keep: torch.Tensor) -> int:
    """Kept positions holding an exact zero get the dtype's smallest normal number, so the mask
    (``W != 0``, and the measured sparsity) is exactly the pruner's keep set. Returns how many."""
    bad = keep & (w == 0)
    n = int(bad.sum())
    if n:
        w[bad] = torch.finfo(w.dtype).tiny
    return n


@torch.no_grad()
def prune_layer(task: LayerTask, sparsity: float, pruner: Pruner, pattern: Optional[NMPattern] = None,
                refiner: Optional[MaskRefiner] = None, *, exact_mask: bool = False) -> torch.Tensor:
    """THE per-layer prune step, shared by one-shot pruning (:mod:`sparse_runtime.prune`) and LoSA's
    re-prune each round (:mod:`sparse_runtime.losa.rounds`): the pruner makes the weight and mask, the
    optional refiner changes the mask on the same statistics (checked: same row counts, same
    pattern), and the result is written into ``task.linear.weight`` in place. Returns the keep-mask.

    ``exact_mask=True`` makes ``W != 0`` equal the returned mask exactly: a kept weight that is
    exactly zero (one pruned in an earlier round, allowed back by a lower rate) holds the dtype's
    smallest normal number instead. LoSA needs it because its adapter's mask is read from ``W != 0``;
    one-shot pruning does not (a kept zero there is simply a zero)."""
    w = task.linear.weight.data
    dense = w.clone() if refiner is not None else w
    out = pruner.prune(task, sparsity, pattern)
    new, keep = out.weight, out.keep
    if refiner is not None:
        new = refiner.refine(task, dense, out.weight, out.keep, pattern, sparsity)
        check_refined(task.name, out.keep, new, out.weight, pattern)
        keep = refined_keep(new, out.keep) if exact_mask else new != 0
    if exact_mask:
        new = new.to(device=w.device, dtype=w.dtype).clone()
        new[~keep] = 0
        fix_kept_zeros_(new, keep)
    w.copy_(new.to(device=w.device, dtype=w.dtype))
    return keep
