"""Continuous batching in one engine thread.

Each scheduler step does, in order: (1) end sequences whose client went away (``cancelled``: the
slot is freed now), whose deadline passed (``timeout``) or, while draining past the grace period,
all of them (``abort``); (2) admit waiting requests into free slots (the lowest free slot first, so
the running slots stay packed and batched attention spans few idle ones); (3) prefill ONE chunk of
at most ``prefill_chunk`` prompt tokens of the oldest sequence still in prefill (so a long prompt
costs every running sequence at most one chunk per token); (4) ONE batched decode step for every
sequence that has a token to feed. So a new request joins the decode batch at the next token
boundary after its prefill, and the batch > 1 kernel paths serve concurrent users.

The asyncio side never blocks on the engine: :meth:`Scheduler.submit` only enqueues (or refuses
with 429 when the queue is full, 503 while draining) and each sequence reports its tokens through
``emit`` (called from this thread; the app hands them to its event loop).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .metrics import Metrics
from .protocol import APIError, SamplingParams
from .sampling import Sampler
from .text import TextStream

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    """One request in flight. ``emit(kind, payload)``: ``("token", (text, [ids]))`` per token and
    ``("done", (finish_reason, usage, full_text, ids))`` once."""

    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    emit: Callable[[str, Any], None]
    timeout: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    arrival: float = field(default_factory=time.perf_counter)
    slot: int = -1
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    next_token: Optional[int] = None
    cancelled: bool = False
    finish_reason: Optional[str] = None
    last_token_time: float = 0.0

    def __post_init__(self):
        self.sampler = Sampler(self.params)
        self.deadline = self.arrival + self.timeout

    @property
    def usage(self) -> dict[str, int]:
        p, c = len(self.prompt_ids), len(self.output)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class Scheduler:
    def __init__(self, slots, *, eos_token_id: Optional[int], prefill_chunk: int = 128, max_queue: int = 64,
                 threads: int = 1, metrics: Optional[Metrics] = None, retry_after: int = 1):
        self.slots = slots
        self.eos = eos_token_id
        self.chunk = max(1, int(prefill_chunk))
        self.max_queue = int(max_queue)
        self.threads = int(threads)
        self.retry_after = str(int(retry_after))
        self.metrics = metrics or Metrics()
        self.cond = threading.Condition()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admitted, in slot order of admission
        self.free_slots = list(range(slots.n))
        self.held = False  # tests: stop admitting and stepping (to fill the queue deterministically)
        self.draining = False
        self.abort_at: Optional[float] = None
        self.stopping = False
        m = self.metrics
        m.gauge("queue_depth", lambda: len(self.waiting), "requests waiting for a slot")
        m.gauge("slots_used", lambda: slots.n - len(self.free_slots), "slots holding a sequence")
        m.gauge("slots_total", lambda: slots.n, "slots (sequences decoded together at most)")
        m.gauge("kv_cache_usage_ratio", self.cache_usage, "tokens held in the KV cache / (slots x capacity)")
        m.gauge("kv_cache_bytes", slots.cache_bytes, "bytes preallocated for the KV cache")
        self.thread = threading.Thread(target=self._loop, name="sparse-runtime-scheduler", daemon=True)
        self.thread.start()

    # -- the asyncio side --------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self.cond:
            if self.draining:
                raise APIError(503, "the server is shutting down; retry on another replica", "server_error",
                               code="shutting_down", headers={"Retry-After": self.retry_after})
            if len(self.waiting) - len(self.free_slots) >= self.max_queue:  # a burst into free slots is no queue
                raise APIError(429, f"the server is busy ({len(self.waiting)} requests waiting for "
                                    f"{self.slots.n} slots); retry later", "rate_limit_exceeded",
                               code="queue_full", headers={"Retry-After": self.retry_after})
            self.waiting.append(seq)
            self.cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """The client went away: the scheduler frees its slot before its next step."""
        with self.cond:
            if seq.finish_reason is None:
                seq.cancelled = True
                self.cond.notify()

    def hold(self, on: bool) -> None:
        with self.cond:
            self.held = on
            self.cond.notify()

    def drain(self, grace: float) -> None:
        """Refuse new requests; let the admitted and queued ones run for ``grace`` seconds, then
        end what is left with finish_reason ``abort``."""
        with self.cond:
            self.draining = True
            self.abort_at = time.perf_counter() + max(0.0, grace)
            self.cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        self.drain(0.0)
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    def cache_usage(self) -> float:
        held = sum(s.prefilled + max(0, len(s.output) - 1) for s in list(self.running))
        return held / max(1, self.slots.n * self.slots.capacity)

    # -- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_num_threads(self.threads)  # OpenMP settings are per thread
        while True:
            with self.cond:
                while not self.stopping and (self.held or not (self.running or self.waiting)):
                    self.cond.wait(0.5)
                if self.stopping and not self.running and not self.waiting:
                    return
                self._expire()
                self._admit()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # an engine failure ends the running sequences, not the server
                log.exception("scheduler step failed")
                for s in list(self.running):
                    self._finish(s, "error", error=str(e))

    def _expire(self) -> None:
        now = time.perf_counter()
        abort = self.abort_at is not None and now >= self.abort_at
        for s in list(self.running):
            if s.cancelled:
                self._finish(s, "cancelled")
            elif abort:
                self._finish(s, "abort")
            elif now > s.deadline:
                self._finish(s, "timeout")
        for s in list(self.waiting):
            if s.cancelled or abort or now > s.deadline:
                self.waiting.remove(s)
                self._finish(s, "cancelled" if s.cancelled else "abort" if abort else "timeout")

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            s = self.waiting.popleft()
            self.free_slots.sort()
            s.slot = self.free_slots.pop(0)
            self.running.append(s)

    def _step(self) -> None:
        pre = next((s for s in self.running if s.prefilled < len(s.prompt_ids)), None)
        if pre is not None:
            n = self.chunk if self.slots.chunked else len(pre.prompt_ids)
            chunk = pre.prompt_ids[pre.prefilled:pre.prefilled + n]
            logits = self.slots.prefill(pre.slot, chunk)
            pre.prefilled += len(chunk)
            self.metrics.inc("prompt_tokens_total", len(chunk))
            if pre.prefilled == len(pre.prompt_ids):
                self._token(pre, pre.sampler(logits))
        dec = [s for s in self.running if s.next_token is not None and s.finish_reason is None]
        if dec:
            logits = self.slots.decode([s.slot for s in dec], [s.next_token for s in dec])
            self.metrics.observe("batch_size", len(dec))
            greedy = logits.argmax(-1).tolist()  # one call for the whole batch (temperature 0 rows)
            for s, row, g in zip(dec, logits, greedy):
                self._token(s, g if s.sampler.greedy else s.sampler(row))

    def _token(self, s: Sequence, tok: int) -> None:
        now = time.perf_counter()
        m = self.metrics
        if s.output:
            m.observe("inter_token_latency_seconds", now - s.last_token_time)
        else:
            m.observe("time_to_first_token_seconds", now - s.arrival)
        s.last_token_time = now
        s.output.append(tok)
        m.inc("generation_tokens_total")
        delta = s.text.push(tok)
        reason = None
        if s.text.stopped or (self.eos is not None and tok == self.eos and not s.params.ignore_eos):
            reason = "stop"
        elif len(s.output) >= s.params.max_tokens or len(s.prompt_ids) + len(s.output) >= self.slots.capacity:
            reason = "length"
        s.next_token = tok if reason is None else None
        if reason is not None:
            delta += s.text.flush()
        s.emit("token", (delta, [tok]))
        if reason is not None:
            self._finish(s, reason)

    def _finish(self, s: Sequence, reason: str, error: Optional[str] = None) -> None:
        if s.finish_reason is not None:
            return
        s.finish_reason = reason
        if s in self.running:
            self.running.remove(s)
        if s.slot >= 0:
            self.slots.free(s.slot)
            self.free_slots.append(s.slot)
            s.slot = -1
        self.metrics.inc("requests_total", label=reason)
        self.metrics.observe("request_duration_seconds", time.perf_counter() - s.arrival)
        s.emit("done", (reason, s.usage, s.text.final_text(), list(s.output), error))
