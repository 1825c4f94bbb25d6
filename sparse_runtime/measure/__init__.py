"""Measuring, as a library: dense against sparse latency per engine with the protocol of
docs/protocols.md, and capped runs of whole commands. (The scripts that use it to produce the
project's figures live in ``benchmarks/``, outside the package; this package is what they and the
``bench`` command and recipe stage import.)

:mod:`.stats` holds the statistics (median, spread, pairing, speedups) and the memory-bandwidth
bound; :mod:`.latency` runs engines and writes the table, JSON and plot (docs/runtime.md);
:mod:`.cgroup` runs a command in its own memory cgroup under a cap (docs/scale.md).
"""
from .stats import Summary, bandwidth_bound, interleaved_order, paired_speedups, summarize

__all__ = ["Summary", "bandwidth_bound", "interleaved_order", "paired_speedups", "summarize"]
