"""Timing in the regime a decode token runs in: weights streamed from memory, not from cache.

A decode token reads every weight of the model once, so on any model larger than the last-level
cache each product finds its weights in DRAM. A measurement that runs the same small set of
matrices again and again finds them in cache instead (SmolLM2's 30 q/k/v matrices are 10 MB of
int8 codes against a 32 MB L3) and then favours the form that does less arithmetic per weight
over the form that reads fewer bytes: the measured dispatch of the lean engines chose dense int8
codes for q/k/v and o of a 70 % model that way, which the real token ran slower (docs/kernels.md,
"Measured dispatch in the streamed regime"). :func:`evict_caches` reads a buffer larger than the
last-level cache before each timed pass so every pass starts from memory.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DEFAULT_LLC = 32 << 20  # when sysfs does not say (not Linux): a common server L3 per CCD / socket slice
EVICT_MAX = 256 << 20  # the eviction buffer's cap (2x the cache, at least 64 MB, at most this)


def _parse_size(text: str) -> int:
    """A sysfs cache size ("32768K", "1M", "512") in bytes."""
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int:
    """Size of the largest cache level CPU 0 reports in sysfs (one instance: the L3 slice it shares),
    or ``DEFAULT_LLC`` where that cannot be read."""
    best = (0, 0)
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((d / "level").read_text())
            size = _parse_size((d / "size").read_text())
        except (OSError, ValueError):
            continue
        best = max(best, (level, size))
    return best[1] or DEFAULT_LLC


@functools.lru_cache(maxsize=1)
def _eviction_buffer() -> torch.Tensor:
    n = min(max(2 * last_level_cache_bytes(), 64 << 20), EVICT_MAX) // 4
    return torch.ones(n)


def evict_caches() -> None:
    """Read a buffer about twice the last-level cache, so the next pass finds its data in memory."""
    _eviction_buffer().sum()


def release_eviction_buffer() -> None:
    """Free the buffer (held between calls of one calibration; it is up to 256 MB)."""
    _eviction_buffer.cache_clear()
