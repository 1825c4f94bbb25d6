"""The causal-LM loss as a module (so DDP can wrap it), returning a SUM and a token count.

Returning the sum lets the engine normalise by the number of target tokens of the whole optimiser
step (all micro-batches, all processes): gradient accumulation and data parallelism then give the
same update as one big batch, even when examples carry different numbers of response tokens.

``chunk_tokens > 0`` computes the LM head and cross-entropy in checkpointed chunks of positions, so
the logits (tokens x vocab: 4096 x 49152 fp32 = 0.8 GB for 8 x 512 on SmolLM2) never exist whole
and are not kept for backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE


def _ce_sum(h: torch.Tensor, head_w: torch.Tensor, head_b, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, head_w, head_b).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


class CausalLMLoss(nn.Module):
    def __init__(self, model: nn.Module, chunk_tokens: int = 0) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids, labels, attention_mask=None):
        tgt = labels[:, 1:].reshape(-1)
        n = (tgt != IGNORE).sum()
        if self.chunk_tokens <= 0:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt,
                                   ignore_index=IGNORE, reduction="sum")
            return loss, n
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        h = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
        head = self.model.get_output_embeddings()
        loss = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], self.chunk_tokens):
            lab = tgt[i:i + self.chunk_tokens]
            if bool((lab != IGNORE).any()):
                loss = loss + checkpoint(_ce_sum, h[i:i + self.chunk_tokens], head.weight, head.bias, lab,
                                         use_reentrant=False)
        return loss, n
