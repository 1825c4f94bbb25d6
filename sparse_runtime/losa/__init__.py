"""LoSA: dynamic low-rank sparse adaptation (Huang et al., ICLR 2025). See docs/losa.md.

``run_losa(model_spec, out, LoSAConfig(sparsity=0.7))`` prunes the DENSE model progressively over
T rounds with a masked, per-layer-rank LoRA and writes an exact sparse checkpoint. This package
holds the method only: its command line is ``sparse-runtime finetune --method losa``
(:mod:`sparse_runtime.commands.losa`), its per-round allocation the registered ``rmi`` allocation
(:mod:`sparse_runtime.allocation.rmi`, re-exported here), its re-prune one-shot pruning's own
per-layer step (:func:`sparse_runtime.pruning.base.prune_layer`). Its adapter (``losa`` in
``FINETUNE_METHODS``) registers itself when the method is first looked up."""
from ..allocation.rmi import cka, cka_matrix, delta_for, gram, lp_allocate, rmi_importance
from .adapter import LoSAAdapter, LoSAAdapterConfig, truncate_svd
from .config import LoSAConfig
from .ranks import allocate_ranks, round_rank_budget
from .rounds import LoSAResult, LoSAVerificationError, RoundRecord, run_losa, run_losa_model
from .schedule import cubic_sparsity, sparsity_schedule

__all__ = ["LoSAAdapter", "LoSAAdapterConfig", "truncate_svd", "LoSAConfig", "lp_allocate", "allocate_ranks",
           "round_rank_budget", "cka", "cka_matrix", "gram", "rmi_importance", "LoSAResult", "LoSAVerificationError",
           "RoundRecord", "run_losa", "run_losa_model", "cubic_sparsity", "delta_for", "sparsity_schedule"]
