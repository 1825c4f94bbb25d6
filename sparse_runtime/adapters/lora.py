"""The low-rank pair every LoRA-style adapter shares (masked LoRA, LoRS, dense LoRA, and LoSA next).

Naming follows HF-PEFT throughout the package: ``lora_A`` is r x in, ``lora_B`` is out x r, and the
update is ΔW = s · B A (LoRA, Hu et al. 2021, Eq. 3). The LoRS repository names them the other way
round (its ``lora_A`` is out x r, its ``lora_B`` r x in; docs/methods.md#lors-parameterisation), so LoRS's "B = top right
singular vectors, A = 0" is, here, ``lora_A = V_r^T / γ`` and ``lora_B = 0``.

Scale: ``scaling="lora"`` gives s = α / r (LoRA, LoSA), ``"rslora"`` gives s = α / √r (LoRS's code,
rsLoRA). ``alpha=None`` takes the method's default.

Per-layer rank: ``ranks`` maps a full layer name to its rank (LoSA allocates ranks per layer);
:meth:`LoRAAdapterBase.set_rank` changes a layer's rank between rounds (growing keeps the learned
subspace and the output; shrinking keeps the components with the largest ‖B_i‖·‖A_i‖).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .base import AdapterConfig, SparseAdapter

SCALINGS = ("lora", "rslora")


@dataclass
class LoRAConfig(AdapterConfig):
    rank: int = 8
    alpha: Optional[float] = None  # None: the method's default (set by its config subclass)
    scaling: str = "lora"
    dropout: float = 0.0
    init: str = "kaiming"  # kaiming (PEFT: A ~ U(kaiming, a=sqrt 5), B = 0) | gradient-svd (LoRS)
    ranks: dict[str, int] = field(default_factory=dict)  # per-layer rank overrides (full names)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        for n, r in self.ranks.items():
            if not isinstance(r, int) or r < 1:
                raise ConfigError(f"rank for {n} must be a positive integer, got {r!r}")
        if self.scaling not in SCALINGS:
            raise ConfigError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("kaiming", "gradient-svd"):
            raise ConfigError(f"init must be 'kaiming' or 'gradient-svd', got {self.init!r}")

    def rank_of(self, name: str) -> int:
        return int(self.ranks.get(name, self.rank))

    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def scale_for(self, rank: int) -> float:
        a = self.effective_alpha()
        return a / rank if self.scaling == "lora" else a / math.sqrt(rank)


class LoRAAdapterBase(SparseAdapter):
    """Holds ``lora_A`` (r x in) and ``lora_B`` (out x r) in fp32, whatever the base dtype."""

    cfg: LoRAConfig

    def __init__(self, base: nn.Linear, cfg: LoRAConfig, name: str = "") -> None:
        super().__init__(base, cfg, name)
        r = cfg.rank_of(name)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @staticmethod
    def check_layer(cfg: LoRAConfig, name: str, lin: nn.Module) -> None:
        r = cfg.rank_of(name)
        limit = min(lin.in_features, lin.out_features)
        if r > limit:
            raise ConfigError(f"rank {r} is larger than layer {name} allows ({lin.out_features} x "
                              f"{lin.in_features}: at most {limit}); lower --rank or its per-layer rank")

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def scale(self) -> float:
        return self.cfg.scale_for(self.rank)

    def delta_weight(self, masked: bool = True) -> torch.Tensor:
        """s · (B A) (⊙ M when ``masked``), fp32, out x in."""
        d = (self.lora_B @ self.lora_A) * self.scale
        return d * self.keep_mask() if masked else d

    def merge_info(self) -> dict[str, Any]:
        return {"rank": self.rank, "scale": self.scale}

    @torch.no_grad()
    def set_rank(self, new_rank: int, keep_output: bool = True) -> None:
        """Change the rank. Growing appends fresh A rows (kaiming) and zero B columns, so ΔW does not
        change; shrinking keeps the ``new_rank`` components with the largest ‖B_i‖‖A_i‖. With
        ``keep_output`` B is rescaled so s·B A is unchanged by the new scale."""
        self.check_layer(self.cfg, self.layer_name, self.base) if new_rank > self.rank else None
        if new_rank < 1:
            raise ConfigError(f"rank must be >= 1, got {new_rank}")
        old_scale, r = self.scale, self.rank
        A, B = self.lora_A.data, self.lora_B.data
        if new_rank >= r:
            extra = torch.empty(new_rank - r, A.shape[1], dtype=A.dtype, device=A.device)
            nn.init.kaiming_uniform_(extra, a=math.sqrt(5))
            A2 = torch.cat([A, extra], 0)
            B2 = torch.cat([B, B.new_zeros(B.shape[0], new_rank - r)], 1)
        else:
            importance = B.norm(dim=0) * A.norm(dim=1)
            keep = torch.sort(torch.topk(importance, new_rank).indices).values
            A2, B2 = A[keep].clone(), B[:, keep].clone()
        self.lora_A = nn.Parameter(A2.contiguous())
        self.lora_B = nn.Parameter(B2.contiguous())
        if keep_output:
            self.lora_B.data.mul_(old_scale / self.scale)

    def resize_for_state(self, key: str, shape) -> None:
        """Loading a state saved at another rank: reshape the pair (values come from the state)."""
        if key in ("lora_A", "lora_B"):
            r = int(shape[0] if key == "lora_A" else shape[1])
            if r != self.rank:
                self.set_rank(r, keep_output=False)
