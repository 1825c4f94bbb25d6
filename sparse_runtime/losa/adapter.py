"""LoSA's adapter: a LoRA whose update is masked by the current weight mask, with a per-layer rank
that changes between rounds (docs/methods.md#losa-adapter-layer).

    y = x W^T + b + s * drop(x) ((B A) ⊙ M)^T,      merge: W' = W + s (B A) ⊙ M  (exact)

Differences from the official vendored PEFT layer, on purpose:

- The rank is PHYSICAL: the pair is resized to each layer's allocated rank, never sliced out of a
  fixed r = 8 (the official code silently caps any allocated rank above 8).
- The scale is fixed at s = alpha / r_base for every layer and round (alpha = 16, r_base = 8: s = 2,
  exactly the official value, which also never changes with the slice), so a rank change does not
  rescale the update.
- The mask is a stored boolean buffer, set by the round loop after each re-prune, rather than
  1[W != 0] recomputed from the base (which, after the round loop's unmerge, could in principle
  hold an exact zero at a kept position).

Rank-change rule (:meth:`LoSAAdapter.set_rank`):

- GROW: keep (A, B) and append fresh rows of A (PEFT's kaiming init) and ZERO columns of B: the
  learned subspace and the output are unchanged, the new directions start training from zero.
- SHRINK (``shrink="svd"``, default): replace B A by its best rank-k approximation (truncated SVD,
  computed from QR factors of B and A^T, so only r x r matrices are decomposed): B' = U_k S_k^1/2,
  A' = S_k^1/2 V_k^T. This keeps the most important directions of the update in Frobenius norm
  (Eckart-Young) and keeps the output exactly when the update's rank is already <= k.
  ``shrink="norm"`` keeps the k components with the largest ||B_i|| ||A_i|| (the package's generic
  rule, :meth:`LoRAAdapterBase.set_rank`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.base import FINETUNE_METHODS, FinetuneMethod
from ..adapters.masked_lora import MaskedLoRA, MaskedLoRAConfig
from ..errors import ConfigError

SHRINK_RULES = ("svd", "norm")


@dataclass
class LoSAAdapterConfig(MaskedLoRAConfig):
    rank: int = 8
    alpha: float | None = 16.0
    dropout: float = 0.1  # official LoRA config
    mask_source: str = "stored"
    shrink: str = "svd"

    def validate(self) -> None:
        super().validate()
        if self.shrink not in SHRINK_RULES:
            raise ConfigError(f"shrink must be one of {SHRINK_RULES}, got {self.shrink!r}")
        if self.mask_source != "stored":
            raise ConfigError("LoSA keeps its mask as a stored buffer (mask_source='stored')")


class LoSAAdapter(MaskedLoRA):
    method = "losa"
    merge_check = "mask"
    cfg: LoSAAdapterConfig

    @property
    def scale(self) -> float:
        """s = alpha / r_base, fixed for every layer and round (official: 16 / 8 = 2)."""
        return self.cfg.scale_for(self.cfg.rank)

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:
        self.mask = keep.to(device=self.base.weight.device, dtype=torch.bool).clone()

    @torch.no_grad()
    def set_rank(self, new_rank: int, keep_output: bool = True) -> None:
        new_rank = int(new_rank)
        if new_rank < 1:
            raise ConfigError(f"rank must be >= 1, got {new_rank}")
        limit = min(self.in_features, self.out_features)
        if new_rank > limit:
            raise ConfigError(f"rank {new_rank} is larger than layer {self.layer_name} allows ({limit})")
        r = self.rank
        if new_rank == r:
            return
        A, B = self.lora_A.data, self.lora_B.data
        if new_rank > r:
            extra = torch.empty(new_rank - r, A.shape[1], dtype=A.dtype, device=A.device)
            nn.init.kaiming_uniform_(extra, a=math.sqrt(5))
            A2 = torch.cat([A, extra], 0)
            B2 = torch.cat([B, B.new_zeros(B.shape[0], new_rank - r)], 1)
        elif self.cfg.shrink == "norm":
            importance = B.norm(dim=0) * A.norm(dim=1)
            keep = torch.sort(torch.topk(importance, new_rank).indices).values
            A2, B2 = A[keep].clone(), B[:, keep].clone()
        else:
            A2, B2 = truncate_svd(B, A, new_rank)
        self.lora_A = nn.Parameter(A2.contiguous())
        self.lora_B = nn.Parameter(B2.contiguous())

    def merge_info(self) -> dict[str, Any]:
        return {"rank": self.rank, "scale": self.scale}


@torch.no_grad()
def truncate_svd(B: torch.Tensor, A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors (A', B') of B A (B: out x r, A: r x in), via B = Q_b R_b, A^T = Q_a R_a."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.t().double())
    U, S, Vh = torch.linalg.svd(Rb @ Ra.t())
    root = S[:k].sqrt()
    B2 = (Qb @ U[:, :k]) * root
    A2 = root[:, None] * (Vh[:k] @ Qa.t())
    return A2.to(A.dtype), B2.to(B.dtype)


FINETUNE_METHODS.register("losa")(FinetuneMethod(
    "losa", LoSAAdapter, LoSAAdapterConfig,
    # official SFTTrainer arguments (docs/methods.md#losa-round-loop step 10); max_grad_norm 0.3 is set by the round loop
    train_defaults=dict(lr=2e-4, schedule="linear", warmup_ratio=0.3, weight_decay=0.001),
    description="LoSA: progressive pruning from the dense model with a masked, per-layer-rank LoRA "
                "(use `sparse-runtime finetune DENSE --method losa --sparsity S`)"))
