"""Prometheus text-format metrics, without a client library (a few counters, gauges and histograms
behind one lock; the scheduler thread writes, ``GET /metrics`` reads).

Names (all prefixed ``sparse_runtime_``): ``requests_total{finish_reason}``, ``request_errors_total
{code}``, ``prompt_tokens_total``, ``generation_tokens_total``, ``time_to_first_token_seconds``,
``inter_token_latency_seconds``, ``request_duration_seconds`` (histograms), ``queue_depth``,
``slots_used``, ``slots_total``, ``kv_cache_usage_ratio`` (tokens held / slots x capacity),
``kv_cache_bytes``, ``batch_size`` (histogram of decode-step batches) and ``resident_memory_bytes``.
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PREFIX = "sparse_runtime_"


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1

    def render(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]
        return out


class Metrics:
    HELP = {
        "requests_total": ("counter", "finished requests by finish_reason"),
        "request_errors_total": ("counter", "requests refused with an HTTP error, by status code"),
        "prompt_tokens_total": ("counter", "prompt tokens prefilled"),
        "generation_tokens_total": ("counter", "tokens generated"),
        "time_to_first_token_seconds": ("histogram", "arrival to first generated token"),
        "inter_token_latency_seconds": ("histogram", "time between consecutive tokens of a sequence"),
        "request_duration_seconds": ("histogram", "arrival to last token"),
        "batch_size": ("histogram", "sequences per decode step"),
    }

    def __init__(self):
        self.lock = threading.Lock()
        self.counters: dict[str, dict[str, float]] = {k: {} for k, (t, _) in self.HELP.items() if t == "counter"}
        self.hists = {k: Histogram(BATCH_BUCKETS if k == "batch_size" else LATENCY_BUCKETS)
                      for k, (t, _) in self.HELP.items() if t == "histogram"}
        self.gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, value: float = 1, label: str = "") -> None:
        with self.lock:
            c = self.counters[name]
            c[label] = c.get(label, 0) + value

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            self.hists[name].observe(value)

    def observe_many(self, name: str, values) -> None:
        with self.lock:
            h = self.hists[name]
            for v in values:
                h.observe(v)

    def gauge(self, name: str, fn: Callable[[], float], help_: str) -> None:
        self.gauges[name] = fn
        self.HELP = {**self.HELP, name: ("gauge", help_)}

    def value(self, name: str, label: str = "") -> float:
        with self.lock:
            return self.counters[name].get(label, 0)

    def render(self) -> str:
        lines: list[str] = []
        with self.lock:
            for name, (kind, help_) in self.HELP.items():
                full = PREFIX + name
                lines += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    lab = {"requests_total": "finish_reason", "request_errors_total": "code"}.get(name)
                    vals = self.counters[name] or {"": 0}
                    for k, v in sorted(vals.items()):
                        lines.append(f'{full}{{{lab}="{k}"}} {v:g}' if lab and k else f"{full} {v:g}")
                elif kind == "histogram":
                    lines += self.hists[name].render(full)
                else:
                    lines.append(f"{full} {float(self.gauges[name]()):g}")
        return "\n".join(lines) + "\n"
