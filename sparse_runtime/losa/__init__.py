"""LoSA: dynamic low-rank sparse adaptation (Huang et al., ICLR 2025). See docs/losa.md.

``run_losa(model_spec, out, LoSAConfig(sparsity=0.7))`` prunes the DENSE model progressively over
T rounds with a masked, per-layer-rank LoRA and writes an exact sparse checkpoint. Importing this
package registers the ``losa`` fine-tuning method (its adapter)."""
from . import adapter as _adapter  # noqa: F401  (registers FINETUNE_METHODS["losa"])
from .adapter import LoSAAdapter, LoSAAdapterConfig, truncate_svd
from .config import LoSAConfig
from .lp_allocation import lp_allocate
from .ranks import allocate_ranks, round_rank_budget
from .rmi import cka, cka_matrix, gram, rmi_importance
from .rounds import LoSAResult, LoSAVerificationError, RoundRecord, run_losa, run_losa_model
from .schedule import cubic_sparsity, delta_for, sparsity_schedule

__all__ = ["LoSAAdapter", "LoSAAdapterConfig", "truncate_svd", "LoSAConfig", "lp_allocate", "allocate_ranks",
           "round_rank_budget", "cka", "cka_matrix", "gram", "rmi_importance", "LoSAResult", "LoSAVerificationError",
           "RoundRecord", "run_losa", "run_losa_model", "cubic_sparsity", "delta_for", "sparsity_schedule"]
