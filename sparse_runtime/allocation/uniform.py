"""Uniform allocation: every selected layer gets the target sparsity (Wanda's and SparseGPT's default)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base import ALLOCATIONS, Allocation, AllocationRequest, BlockLayout


@dataclass
class UniformOptions:
    """Uniform allocation has no options."""


@ALLOCATIONS.register("uniform")
@dataclass
class UniformAllocator:
    Options: ClassVar[type] = UniformOptions
    options: UniformOptions = field(default_factory=UniformOptions)
    needs_calibration: bool = False

    def check(self, sparsity: float, layout: BlockLayout, cfg) -> None:
        return None

    def allocate(self, req: AllocationRequest) -> Allocation:
        return Allocation([float(req.sparsity)] * len(req.layout.blocks), {})
