"""Layer-wise sparsity allocation behind the :data:`ALLOCATIONS` registry: ``uniform``, ``owl``, ``atp``,
``rmi`` (LoSA's).

Per-block rates whose parameter-weighted mean is exactly the target (see :mod:`.base`).
"""
from .base import ALLOCATIONS, Allocation, AllocationRequest, Allocator, BlockLayout, weighted_mean
from . import atp, owl, uniform  # noqa: F401  (registration)
from ..registry import import_submodules

import_submodules(__name__, __path__)  # a new allocation's file here registers itself: nothing to add
from .atp import ATPOptions, atp_beta_max, atp_rates, beta_candidates, check_beta
from .owl import OWLOptions, outlier_ratio, owl_rates
from .rmi import RMIOptions
from .uniform import UniformOptions

__all__ = ["ALLOCATIONS", "Allocation", "AllocationRequest", "Allocator", "BlockLayout", "weighted_mean",
           "ATPOptions", "OWLOptions", "RMIOptions", "UniformOptions",
           "atp_beta_max", "atp_rates", "beta_candidates", "check_beta", "outlier_ratio", "owl_rates"]
