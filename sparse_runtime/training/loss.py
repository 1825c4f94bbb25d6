"""The causal-LM loss as a module (so DDP can wrap it), returning a SUM and a token count.

Returning the sum lets the engine normalise by the number of target tokens of the whole optimiser
step (all micro-batches, all processes): gradient accumulation and data parallelism then give the
same update as one big batch, even when examples carry different numbers of response tokens.

``chunk_tokens > 0`` computes the LM head and cross-entropy in checkpointed chunks of positions, so
the logits (tokens x vocab: 4096 x 49152 fp32 = 0.8 GB for 8 x 512 on SmolLM2) never exist whole
and are not kept for backward.

With a :class:`~.distill.Distiller` the module adds the distillation terms of :mod:`.distill`:
loss = (1 - w) CE + w KD, still returned as a sum over target tokens; the step's parts (CE, KL,
block term, each a sum) are left in ``last_parts`` for the log. ``distill=False`` (evaluation) gives
the plain CE.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE
from .distill import DEFAULT_CHUNK_TOKENS, ce_kl_chunk


def _ce_sum(h: torch.Tensor, head_w: torch.Tensor, head_b, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, head_w, head_b).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


class CausalLMLoss(nn.Module):
    def __init__(self, model: nn.Module, chunk_tokens: int = 0, distiller=None) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.distiller = distiller  # a plain object: the teacher is not a submodule (DDP, state_dict)
        self.last_parts: Optional[torch.Tensor] = None  # [CE sum, KL sum, block sum] of the last forward

    def forward(self, input_ids, labels, attention_mask=None, distill: bool = True):
        if distill and self.distiller is not None and self.distiller.teacher is not None:
            return self._distill_forward(input_ids, labels, attention_mask)
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

    def _distill_forward(self, input_ids, labels, attention_mask):
        """Student forward (its block outputs referenced by hooks), teacher forward under no_grad
        (each block compared as it is produced), then CE and KL over the LM heads in chunks."""
        d = self.distiller
        tgt = labels[:, 1:].reshape(-1)
        n = (tgt != IGNORE).sum()
        if d.matcher is not None:
            d.matcher.begin(labels[:, 1:] != IGNORE)
        try:
            out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            if d.matcher is not None:
                d.matcher.student_done()
            with torch.no_grad():
                t_out = d.teacher.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            terms = d.matcher.end() if d.matcher is not None else []
        hs = out.last_hidden_state
        h = hs[:, :-1].reshape(-1, hs.shape[-1])
        h_t = t_out.last_hidden_state[:, :-1].reshape(-1, hs.shape[-1]) if d.logits else None
        head = self.model.get_output_embeddings()
        t_head = d.teacher.get_output_embeddings()
        chunk = self.chunk_tokens if self.chunk_tokens > 0 else DEFAULT_CHUNK_TOKENS
        sums = h.new_zeros(2, dtype=torch.float32)
        for i in range(0, h.shape[0], chunk):
            lab = tgt[i:i + chunk]
            if bool((lab != IGNORE).any()):
                sums = sums + checkpoint(ce_kl_chunk, h[i:i + chunk], head.weight, head.bias, lab,
                                         None if h_t is None else h_t[i:i + chunk], t_head.weight, t_head.bias,
                                         d.temperature, use_reentrant=False)
        ce, kl = sums[0], sums[1]
        blocks = n.to(torch.float32) * torch.stack(terms).sum() if terms else ce.new_zeros(())
        self.last_parts = torch.stack([ce, kl, blocks]).detach()
        w = d.weight
        return (1.0 - w) * ce + w * (kl + blocks), n
