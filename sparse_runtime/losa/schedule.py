"""LoSA's sparsity schedule and the LP's half-width (docs/methods.md#losa-round-loop steps 2-3).

Cubic schedule (the paper's Eq. 9, after Zhu & Gupta's gradual pruning): round t = 1..T prunes to

    s_t = S (1 - (1 - t/T)^3)

so T = 5 gives 0.488 S, 0.784 S, 0.936 S, 0.992 S, S: most of the pruning happens early, while the
model still has most of its weights to recover from, and the last rounds only polish.

Half-width delta(s_t) of the per-layer box s_t - delta <= x_l <= s_t + delta. The official table is

    s_t <= 0.5: 0.01    s_t <= 0.6: 0.02    s_t <= 0.7: 0.03    above: undefined (the code crashes)

We keep it where it is defined and extend the same staircase (+0.01 per 0.1 of sparsity) above:
(0.7, 0.8] -> 0.04, (0.8, 0.9] -> 0.05, (0.9, 1) -> 0.06; then cap it so the box stays inside
[0, 1): delta <= s_t (no negative rate) and delta <= (1 - s_t) / 2 (no layer at or above
(1 + s_t) / 2, which keeps every layer strictly below 1). This is defined for every s_t in [0, 1).
"""
from __future__ import annotations

import math

from ..errors import ConfigError


def cubic_sparsity(S: float, t: int, T: int) -> float:
    """s_t = S (1 - (1 - t/T)^3) for round t in 1..T."""
    if T < 1:
        raise ConfigError(f"LoSA needs at least one round (T >= 1), got T={T}")
    if not 1 <= t <= T:
        raise ConfigError(f"round t={t} is outside 1..T={T}")
    return float(S) * (1.0 - (1.0 - t / T) ** 3)


def sparsity_schedule(S: float, T: int, kind: str = "cubic") -> list[float]:
    """Per-round targets. ``cubic``: the paper's; ``flat``: S every round (starting from an already
    pruned checkpoint, a documented deviation: the paper always starts from the dense model)."""
    if T < 1:
        raise ConfigError(f"LoSA needs at least one round (T >= 1), got T={T}")
    if kind == "cubic":
        out = [cubic_sparsity(S, t, T) for t in range(1, T + 1)]
        out[-1] = float(S)  # exactly S in the last round (no float residue)
        return out
    if kind == "flat":
        return [float(S)] * T
    raise ConfigError(f"schedule must be 'cubic' or 'flat', got {kind!r}")


def delta_for(s_t: float) -> float:
    """The LP's half-width for round target ``s_t`` (see the module docstring)."""
    s = float(s_t)
    if not 0.0 <= s < 1.0:
        raise ConfigError(f"round sparsity {s} is outside [0, 1)")
    if s <= 0.5:
        d = 0.01
    else:
        d = 0.01 + 0.01 * math.ceil(round((s - 0.5) / 0.1, 9))
        d = min(d, 0.06)
    return max(0.0, min(d, s, (1.0 - s) / 2.0))
