"""A toy pruner in ONE file: the worked example of docs/architecture.md, "Adding a method".

Random scores, so it is useless for quality; it shows everything a method needs: its own options
dataclass (checked by the framework: unknown keys and wrong types are one clear line), the
``Options`` link, and one ``register`` line. Load it with ``SPARSE_RUNTIME_PLUGINS=toy_random_pruner``
(the module must be importable) and use it as ``--method toy-random --method-option seed=3`` or, in
a recipe, ``method: toy-random`` with ``method_options: {seed: 3}``. tests/test_add_method.py runs it.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from sparse_runtime.errors import ConfigError
from sparse_runtime.pruning import PRUNERS, PruneOutput, apply_keep
from sparse_runtime.sparsity import NMPattern, nm_prune_mask, topk_prune_mask


@dataclass
class ToyOptions:
    """``seed``: the random scores' seed (each layer mixes in its own name)."""

    seed: int = 0

    def validate(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"toy-random seed must be >= 0, got {self.seed}")


@PRUNERS.register("toy-random")
@dataclass
class ToyRandomPruner:
    Options: ClassVar[type] = ToyOptions
    options: ToyOptions = field(default_factory=ToyOptions)
    needs: frozenset = frozenset()  # input statistics it reads: none, so no calibration data is drawn

    def prune(self, task, sparsity: float, pattern: Optional[NMPattern]) -> PruneOutput:
        w = task.linear.weight.data
        g = torch.Generator().manual_seed(self.options.seed * 1_000_003 + zlib.crc32(task.name.encode()))
        score = torch.rand(w.shape, generator=g)
        keep = nm_prune_mask(score, pattern) if pattern is not None else topk_prune_mask(score, sparsity, per_row=True)
        return PruneOutput(apply_keep(w, keep.to(w.device)), keep.to(w.device))
