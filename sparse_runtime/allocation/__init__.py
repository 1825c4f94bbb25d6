"""Layer-wise sparsity allocation behind the :data:`ALLOCATIONS` registry: ``uniform``, ``owl``, ``atp``.

Per-block rates whose parameter-weighted mean is exactly the target (see :mod:`.base`).
"""
from .base import ALLOCATIONS, Allocation, AllocationRequest, Allocator, BlockLayout, weighted_mean
from . import atp, owl, uniform  # noqa: F401  (registration)
from .atp import atp_beta_max, atp_rates, beta_candidates, check_beta
from .owl import outlier_ratio, owl_rates

__all__ = ["ALLOCATIONS", "Allocation", "AllocationRequest", "Allocator", "BlockLayout", "weighted_mean",
           "atp_beta_max", "atp_rates", "beta_candidates", "check_beta", "outlier_ratio", "owl_rates"]
