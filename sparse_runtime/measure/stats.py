"""Statistics of paired latency runs (docs/protocols.md#latency-and-speedup).

- Runs of the dense and the sparse models are INTERLEAVED after a warm-up (round r runs every
  model once, in an order rotated by r), so slow drifts of a shared machine hit all models alike.
- Each model's figure is the MEDIAN of its timed runs; the spread is the inter-quartile range and
  the min-max range.
- Speedup = median(dense) / median(sparse); the PAIRWISE speedups are dense_r / sparse_r within
  each round r, whose median and IQR say how stable the ratio is (a speedup whose pairwise IQR
  includes 1.0 is not a speedup).
- The memory-bandwidth bound at batch-1 decode: a speedup cannot exceed bytes of the dense weights
  read per token / bytes of the sparse encoding read per token.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence


def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default 'linear' method) without numpy."""
    s = sorted(float(x) for x in xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(xs: Sequence[float]) -> float:
    return _quantile(xs, 0.5)


@dataclass
class Summary:
    n: int
    median: float
    q1: float
    q3: float
    min: float
    max: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def rel_iqr(self) -> float:
        """IQR relative to the median (the noise of this figure)."""
        return self.iqr / self.median if self.median else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "iqr": self.iqr}


def summarize(xs: Sequence[float]) -> Summary:
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("no timings to summarise")
    return Summary(len(xs), median(xs), _quantile(xs, 0.25), _quantile(xs, 0.75), min(xs), max(xs))


def interleaved_order(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The run order: round r runs every model once, rotated by r (so no model always runs first
    after the previous model's cache pollution or thermal state)."""
    k = len(names)
    return [[names[(i + r) % k] for i in range(k)] for r in range(rounds)]


def paired_speedups(dense: Sequence[float], sparse: Sequence[float]) -> list[float]:
    """dense_r / sparse_r for each round r (the two lists are the same rounds, in order)."""
    if len(dense) != len(sparse):
        raise ValueError(f"pairing needs the same number of rounds, got {len(dense)} and {len(sparse)}")
    return [d / s for d, s in zip(dense, sparse)]


@dataclass
class Speedup:
    speedup: float          # median(dense) / median(sparse)
    paired_median: float    # median of dense_r / sparse_r
    paired_q1: float
    paired_q3: float
    paired_min: float
    paired_max: float

    @property
    def verdict(self) -> str:
        """Plain words: a speedup only when the whole pairwise IQR is above 1.05."""
        if self.paired_q1 > 1.05:
            return "faster"
        if self.paired_q3 < 0.95:
            return "slower"
        return "no speedup"

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def speedup(dense: Sequence[float], sparse: Sequence[float]) -> Speedup:
    pr = paired_speedups(dense, sparse)
    s = summarize(pr)
    return Speedup(median(dense) / median(sparse), s.median, s.q1, s.q3, s.min, s.max)


def bitmask_bytes(numel: int, nnz: int, value_bytes: int = 4) -> float:
    """Bytes of a values + 1-bit-per-weight bitmask encoding."""
    return nnz * value_bytes + numel / 8


def bandwidth_bound(layers: Iterable[tuple[int, int]], dense_extra: int = 0, value_bytes: int = 4) -> dict:
    """The decode speedup limit from bytes read per token (docs/protocols.md#the-memory-bandwidth-bound).

    ``layers``: (numel, nnz) of each pruned matrix; ``dense_extra``: weights read per token that stay
    dense (e.g. the lm_head). Returns the bound on the pruned matrices alone (the docs/protocols.md
    figure: 4 / (0.3*4 + 0.125) = 3.0x at 70 % fp32) and on the whole model's per-token read."""
    dense_b = sparse_b = 0.0
    for numel, nnz in layers:
        dense_b += numel * value_bytes
        sparse_b += min(bitmask_bytes(numel, nnz, value_bytes), numel * value_bytes)
    extra = dense_extra * value_bytes
    return {"pruned_layers": dense_b / sparse_b if sparse_b else float("nan"),
            "model": (dense_b + extra) / (sparse_b + extra) if sparse_b + extra else float("nan")}
