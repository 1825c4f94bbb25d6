"""A test hook: named fault points where the process can kill itself, to test ``kill -9`` recovery.

``SPARSE_RUNTIME_FAULT=<point>`` makes the process send itself ``SIGKILL`` the first time it reaches
the named point (``SPARSE_RUNTIME_FAULT=<point>:<n>``: the n-th time). A real ``kill -9`` from
outside lands at a random instant; these points pin it to the instants that matter (in the middle
of a write, just before or just after the rename that publishes an output), so a test can kill
there every time and check that a rerun gives the result of an uninterrupted run.

It is a test hook, not a feature (docs/reliability.md lists the points). When the variable is not
set, :func:`fault_point` is one dictionary look-up.

Points: ``calibration`` (prune/repair, after the first block's calibration forward),
``train-step`` (fine-tuning, after an optimiser step), ``shard`` (a streamed output's first
shard written, the rest not yet), ``write`` (a checkpoint's weights written
into its temporary directory, the rest not yet), ``before-rename`` (an output directory
complete in its temporary directory, not yet renamed into place), ``after-rename`` (renamed into
place, the previous output not yet removed).
"""
from __future__ import annotations

import os
import signal

ENV = "SPARSE_RUNTIME_FAULT"
POINTS = ("calibration", "train-step", "shard", "write", "before-rename", "after-rename")
_seen: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here when ``$SPARSE_RUNTIME_FAULT`` names ``name`` (see module doc)."""
    want = os.environ.get(ENV)
    if not want:
        return
    point, _, nth = want.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
