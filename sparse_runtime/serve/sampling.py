"""Next-token choice per request: greedy at temperature 0 (argmax, exactly what ``generate`` does),
else temperature, top-k and top-p (nucleus) sampling from a per-request ``torch.Generator``, seeded
by the request's ``seed`` so a sampled answer is reproducible whatever else the batch holds."""
from __future__ import annotations

from typing import Optional

import torch

from .protocol import SamplingParams


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen: Optional[torch.Generator] = None
        if params.temperature > 0:
            self.gen = torch.Generator()
            if params.seed is not None:
                self.gen.manual_seed(int(params.seed) % 2 ** 63)
            else:
                self.gen.seed()

    @property
    def greedy(self) -> bool:
        return self.gen is None

    def __call__(self, logits: torch.Tensor) -> int:
        """One token id from a logits row ``[V]``."""
        if self.gen is None:
            return int(torch.argmax(logits))
        x = logits.float() / self.p.temperature
        if self.p.top_k and self.p.top_k < x.numel():
            kth = torch.topk(x, self.p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, -1)
        if self.p.top_p < 1.0:
            sp, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, 0) - sp < self.p.top_p  # the smallest prefix reaching top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], sp[keep])
        return int(torch.multinomial(probs, 1, generator=self.gen))
