"""LoSA's sparsity schedule (docs/methods.md#losa-round-loop step 2).

Cubic schedule (the paper's Eq. 9, after Zhu & Gupta's gradual pruning): round t = 1..T prunes to

    s_t = S (1 - (1 - t/T)^3)

so T = 5 gives 0.488 S, 0.784 S, 0.936 S, 0.992 S, S: most of the pruning happens early, while the
model still has most of its weights to recover from, and the last rounds only polish.

The LP's half-width delta(s_t) of each round's allocation lives with the RMI allocation
(:func:`sparse_runtime.allocation.rmi.delta_for`).
"""
from __future__ import annotations

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
