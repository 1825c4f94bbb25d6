"""The latency benchmark: dense against sparse, per engine, with the protocol of docs/protocols.md.

:mod:`.stats` holds the statistics (median, spread, pairing, speedups) and the memory-bandwidth
bound; :mod:`.latency` runs engines and writes the table, JSON and plot. See docs/runtime.md.
"""
from .stats import Summary, bandwidth_bound, interleaved_order, paired_speedups, summarize

__all__ = ["Summary", "bandwidth_bound", "interleaved_order", "paired_speedups", "summarize"]
