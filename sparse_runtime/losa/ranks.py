"""Per-layer LoRA ranks from reconstruction errors (the paper's Eq. 7; docs/methods.md#losa-round-loop step 9).

Layers whose sparse outputs drift furthest from the dense model get more rank. The official
``allocate_ranks`` rounds err_l / sum(err) * total, clips to [1, 16] and then nudges the total back
in one pass, which can miss the total when the clipping is large; and the ranks above the adapter's
physical r = 8 were silently capped. Here:

1. the real-valued share is found by water-filling: r_l = clip(lambda * err_l, r_min, r_max) with
   lambda chosen (bisection) so that sum_l r_l = total;
2. integers by largest remainder within the bounds;

so the total is EXACTLY ``total`` and every rank is in [r_min, r_max], whenever
L * r_min <= total <= L * r_max (else a ConfigError). The adapter is resized to each allocated rank
(:meth:`~sparse_runtime.losa.adapter.LoSAAdapter.set_rank`), so nothing is capped.

Per-round budget (the code's r_bar_t = 6, 7, 8, 9, 10 for T = 5 and r = 8):
total_t = round(L * (r + t - (T + 1) / 2)), i.e. the mean rank rises by one per round around r.
"""
from __future__ import annotations

import math
from typing import Sequence

from ..errors import ConfigError

RANK_SCHEDULES = ("rising", "constant")


def round_rank_budget(rank: int, t: int, T: int, L: int, schedule: str = "rising") -> int:
    if schedule not in RANK_SCHEDULES:
        raise ConfigError(f"rank_schedule must be one of {RANK_SCHEDULES}, got {schedule!r}")
    mean = rank + (t - (T + 1) / 2.0) if schedule == "rising" else float(rank)
    return int(round(L * mean))


def allocate_ranks(errors: Sequence[float], total: int, r_min: int = 1, r_max: int = 16) -> list[int]:
    L = len(errors)
    if L == 0:
        raise ConfigError("no layers to allocate ranks to")
    if r_min < 1 or r_max < r_min:
        raise ConfigError(f"rank bounds must satisfy 1 <= r_min <= r_max, got [{r_min}, {r_max}]")
    if total < L * r_min:
        raise ConfigError(f"rank budget {total} is smaller than {L} layers x minimum rank {r_min}: every layer "
                          "needs at least one rank; raise the rank or lower r_min")
    if total > L * r_max:
        raise ConfigError(f"rank budget {total} exceeds {L} layers x maximum rank {r_max}; raise r_max or lower "
                          "the rank")
    e = [max(0.0, float(v)) if math.isfinite(float(v)) else 0.0 for v in errors]
    if sum(e) <= 0:
        e = [1.0] * L

    def filled(lam: float) -> list[float]:
        return [min(r_max, max(r_min, lam * v)) for v in e]

    lo_l, hi_l = 0.0, 1.0
    while sum(filled(hi_l)) < total and hi_l < 1e300:
        hi_l *= 2.0
    for _ in range(200):
        mid = (lo_l + hi_l) / 2.0
        if sum(filled(mid)) < total:
            lo_l = mid
        else:
            hi_l = mid
    real = filled(hi_l)
    ranks = [min(r_max, max(r_min, int(math.floor(v)))) for v in real]
    left = total - sum(ranks)
    # largest remainder first (ties: larger error, then earlier layer); respect the bounds
    order = sorted(range(L), key=lambda l: (-(real[l] - math.floor(real[l])), -e[l], l))
    while left > 0:
        moved = False
        for l in order:
            if left == 0:
                break
            if ranks[l] < r_max:
                ranks[l] += 1
                left -= 1
                moved = True
        if not moved:
            break
    order_down = sorted(range(L), key=lambda l: (real[l] - math.floor(real[l]), e[l], l))
    while left < 0:
        moved = False
        for l in order_down:
            if left == 0:
                break
            if ranks[l] > r_min:
                ranks[l] -= 1
                left += 1
                moved = True
        if not moved:
            break
    assert sum(ranks) == total, (ranks, total)
    return ranks
