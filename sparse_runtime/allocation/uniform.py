"""Uniform allocation: every selected layer gets the target sparsity (Wanda's and SparseGPT's default)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import ALLOCATIONS, Allocation, AllocationRequest, BlockLayout


@ALLOCATIONS.register("uniform")
@dataclass
class UniformAllocator:
    needs_calibration: bool = False

    def check(self, sparsity: float, layout: BlockLayout, cfg) -> None:
        return None

    def allocate(self, req: AllocationRequest) -> Allocation:
        return Allocation([float(req.sparsity)] * len(req.layout.blocks), {})
