"""Layer-wise sparsity allocation: the contract every allocator follows.

An allocator gives each decoder BLOCK a sparsity; all selected linears of a block share it, as in
OWL and ATP (docs/methods.md#owl, #atp). "The average" is the PARAMETER-WEIGHTED mean over the selected
linears: sum_l n_l s_l / sum_l n_l = S exactly (up to float rounding), where n_l is the number of
selected weights in block l. With the default selection every block has the same size, so this is
the papers' plain mean over blocks; with include/exclude patterns that make blocks differ it is
still the true fraction of zeros the user asked for.

Measured sparsity can differ from the allocated target only by the per-row/per-group flooring of
the pruning method (floor(C_in * s) weights per row for Wanda).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

from ..registry import Registry

ALLOCATIONS: Registry = Registry("allocation")


@dataclass
class BlockLayout:
    """The blocks that hold selected linears (in model order) and how many weights each holds."""

    blocks: list[int]
    params: list[int]

    @property
    def weights(self) -> list[float]:
        total = float(sum(self.params))
        return [p / total for p in self.params]


@dataclass
class AllocationRequest:
    """What an allocator may use.

    ``stats_pass(on_layer, needs)`` runs the sequential driver over the calibration data WITHOUT
    pruning (OWL's pass 1). ``trial(rates)`` prunes the dense model with per-block rates, scores it
    on held-out data (never the test set) and restores the dense weights; lower is better (ATP's
    beta search). ``block_pass(on_block_end, max_samples)`` runs the model block by block over (the
    first ``max_samples`` of) the calibration data WITHOUT pruning and calls
    ``on_block_end(block_index, block, inputs, outputs)`` after each block (RMI's Gram matrices).
    """

    sparsity: float
    layout: BlockLayout
    cfg: Any
    stats_pass: Optional[Callable] = None
    trial: Optional[Callable[[Sequence[float]], float]] = None
    block_pass: Optional[Callable[[Callable, int], Any]] = None


@dataclass
class Allocation:
    rates: list[float]  # per block, in layout order
    info: dict[str, Any] = field(default_factory=dict)


class Allocator(Protocol):
    """One allocation method. Like a pruner it may declare ``Options`` (a dataclass in its own file,
    filled from ``PruneConfig.allocation_options``) and is then constructed as ``cls(options)``."""

    needs_calibration: bool

    def check(self, sparsity: float, layout: BlockLayout, cfg: Any) -> None:
        """Raise ConfigError for options that cannot work, before any work is done."""

    def allocate(self, req: AllocationRequest) -> Allocation: ...


def weighted_mean(rates: Sequence[float], weights: Sequence[float]) -> float:
    total = float(sum(weights))
    return sum(r * w for r, w in zip(rates, weights)) / total


def clip_unit(rates: Sequence[float], eps: float = 1e-9) -> list[float]:
    """Clip float noise (|excess| <= eps) at the ends of [0, 1]; larger excursions are bugs."""
    out = []
    for r in rates:
        if -eps <= r < 0:
            r = 0.0
        elif 1 < r <= 1 + eps:
            r = 1.0
        out.append(float(r))
    return out
