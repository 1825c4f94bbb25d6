"""The engine seen by the scheduler: ``n`` slots of ``capacity`` tokens, ``prefill(slot, ids)``,
``decode(slots, tokens)`` and ``free(slot)``.

- :class:`BatchedSlots`: engines with the slot interface (``sparse-cpu``, ``lean-cpu``;
  ``Engine.supports_slots``): a preallocated KV cache per slot, one batched forward per decode step
  for every running sequence (continuous batching), prompts prefilled in chunks.
- :class:`SwappedSlots`: every other engine (``torch-cpu``, ``ort-cpu``, ``ort-sparse``). They hold
  one sequence; here each slot keeps its own copy of that state (the engine's cache object), put
  back before the slot's next step, so sequences still interleave token by token but each step is
  batch 1 and the prompt is prefilled whole. Correct, not fast: the fast path is the lean engines.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

# the attributes that hold an engine's single sequence (its KV cache), per engine implementation
_STATE_ATTRS = (("_cache",), ("_past", "_len"))


class BatchedSlots:
    batched = True
    chunked = True

    def __init__(self, engine, n_slots: int, capacity: int):
        self.engine, self.n, self.capacity = engine, int(n_slots), int(capacity)
        engine.init_slots(self.n, self.capacity)

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        return self.engine.prefill_slot(slot, ids)

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        return self.engine.decode_slots(slots, tokens)

    def free(self, slot: int) -> None:
        self.engine.free_slot(slot)

    def cache_bytes(self) -> int:
        return int(self.engine.slot_bytes())


class SwappedSlots:
    batched = False
    chunked = False  # the whole prompt in one prefill (the engines' decode takes one token)

    def __init__(self, engine, n_slots: int, capacity: int):
        self.engine = engine
        self.attrs: Optional[tuple[str, ...]] = next(
            (a for a in _STATE_ATTRS if all(hasattr(engine, n) for n in a)), None)
        self.n = int(n_slots) if self.attrs else 1  # an engine whose state we cannot swap: one at a time
        limit = getattr(engine, "max_length", None)
        self.capacity = int(min(capacity, limit)) if limit else int(capacity)
        self.states: dict[int, Any] = {}
        self.current: Optional[int] = None

    def _switch(self, slot: int) -> None:
        if self.current == slot or self.attrs is None:
            self.current = slot
            return
        if self.current is not None and self.current in self.states:
            self.states[self.current] = tuple(getattr(self.engine, a) for a in self.attrs)
        if slot in self.states:
            for a, v in zip(self.attrs, self.states[slot]):
                setattr(self.engine, a, v)
        self.current = slot

    def _save(self, slot: int) -> None:
        if self.attrs is not None:
            self.states[slot] = tuple(getattr(self.engine, a) for a in self.attrs)

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        self._switch(slot)
        logits = self.engine.prefill(np.asarray([ids], dtype=np.int64))
        self._save(slot)
        return torch.from_numpy(np.ascontiguousarray(logits[0, -1]))

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        out = []
        for s, t in zip(slots, tokens):
            self._switch(s)
            logits = self.engine.decode(np.asarray([[t]], dtype=np.int64))
            self._save(s)
            out.append(torch.from_numpy(np.ascontiguousarray(logits[0, -1])))
        return torch.stack(out)

    def free(self, slot: int) -> None:
        self.states.pop(slot, None)
        if self.current == slot:
            self.current = None

    def cache_bytes(self) -> int:
        return 0  # held by the engine's own cache objects, not preallocated


def make_slots(engine, n_slots: int, capacity: int):
    if getattr(engine, "supports_slots", False):
        return BatchedSlots(engine, n_slots, capacity)
    return SwappedSlots(engine, n_slots, capacity)
