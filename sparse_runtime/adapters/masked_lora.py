"""Masked LoRA through autograd: y = x (W + s · (B A) ⊙ M)^T + b (the SQFT-style reference).

The simple, obviously-correct form of a mask-preserving LoRA. Autograd keeps the masked dense
weight W̃ = W + s (BA) ⊙ M (out x in, per layer) alive until backward, plus the mask when it is not
a stored buffer: exactly the memory LoRS avoids. It is kept as the reference LoRS is tested
against and as the baseline of the memory benchmark. SQFT's code never applies its ``scaling``
field (docs/methods.md#lors-training-setup); here the scale is applied (s = α/r, α = 2r by default: LoSA's r=8, α=16),
so the same rank and scale compare across methods.

With dropout > 0 the update path gets its own dropped input (LoSA's layer):
y = x W^T + b + s · drop(x) ((B A) ⊙ M)^T.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import FINETUNE_METHODS, FinetuneMethod
from .lora import LoRAAdapterBase, LoRAConfig


@dataclass
class MaskedLoRAConfig(LoRAConfig):
    mask_source: str = "stored"  # SQFT keeps the mask; "weights" recomputes it each forward


class MaskedLoRA(LoRAAdapterBase):
    method = "masked-lora"
    merge_check = "mask"

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.base.weight
        if self.cfg.dropout > 0:
            y = F.linear(x, W, self.base.bias)
            d = self.delta_weight(masked=True).to(x.dtype)
            return y + F.linear(self.dropout(x), d)
        w_eff = (W.float() + self.delta_weight(masked=True)).to(W.dtype)
        return F.linear(x, w_eff, self.base.bias)

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight.detach().float() + self.delta_weight(masked=True).detach()


FINETUNE_METHODS.register("masked-lora")(FinetuneMethod(
    "masked-lora", MaskedLoRA, MaskedLoRAConfig,
    train_defaults=dict(lr=2e-4, schedule="linear", warmup_ratio=0.03, weight_decay=0.0),
    description="masked LoRA through autograd (SQFT-style reference): y = x(W + s BA ⊙ M)^T"))
