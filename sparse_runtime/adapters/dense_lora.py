"""Plain (dense) LoRA, y = x W^T + b + s · drop(x) A^T B^T, and the papers' "LoRA*" baseline:
merge densely (W + s B A is dense: the update ignores the mask) and re-prune to the base model's
sparsity (SEFT and LoRS compare against it; docs/methods.md#seft-setup, #merge-rules "plain LoRA").

The adapter never forms an out x in matrix in training (x A^T first), so it is the cheapest of the
three in memory; what it costs is quality after the lossy re-prune. The re-prune itself lives in
:mod:`sparse_runtime.merge` (``reprune="wanda" | "magnitude" | "mask"``) and keeps each row's count
of zeros (unstructured) or the N:M pattern, so the merged model has the base model's sparsity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import FINETUNE_METHODS, FinetuneMethod
from .lora import LoRAAdapterBase, LoRAConfig


@dataclass
class DenseLoRAConfig(LoRAConfig):
    pass


class DenseLoRA(LoRAAdapterBase):
    method = "dense-lora"
    merge_check = "reprune"

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base.weight, self.base.bias)
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
        return y + F.linear(h, self.lora_B.to(x.dtype)) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + s B A, dense (the re-prune happens in the merge)."""
        return self.base.weight.detach().float() + self.delta_weight(masked=False).detach()


FINETUNE_METHODS.register("dense-lora")(FinetuneMethod(
    "dense-lora", DenseLoRA, DenseLoRAConfig,
    train_defaults=dict(lr=2e-4, schedule="linear", warmup_ratio=0.03, weight_decay=0.0),
    description="plain LoRA; merge densely then re-prune (the papers' LoRA* baseline)"))
