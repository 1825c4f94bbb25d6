"""One checkpoint step: the shape shared by every verb that turns a checkpoint into a new one.

Prune, repair and merge all do the same six things around their own work, and each used to spell
them out: refuse an output that exists (unless ``overwrite``) or that overlaps an input, both
before anything is loaded, so a bad ``out`` costs nothing; load; run the work; build the sparsity
manifest with the step's record (the history carried forward); save atomically (safetensors,
tokenizer, manifest and the verb's own files such as a report, all inside the temporary directory
that is renamed into place last, see :class:`~sparse_runtime.manifest.atomic_directory`); and time
each phase. :func:`checkpoint_step` does them once; a verb supplies ``load``, ``work`` and
``manifest`` callables and, optionally, ``write_extra`` for its own files.

The verbs keep the timing keys their reports used before (``total_s``, ``dense_load_s``, ...): the
step's own phases (``load_s``, ``work_s``, ``save_s``, ``total_s``) are in :attr:`StepOutcome.timing`
for a verb to copy from, not written anywhere by themselves.

Not every verb fits: fine-tuning writes a run directory (checkpoints while it trains, resumable,
see :mod:`sparse_runtime.training.engine`) and export writes engine files verified on reload
(:func:`exporters.export`); both share the refusals (:func:`refuse_output`) but not the rest.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, Optional, TypeVar

from .errors import CheckpointExistsError, ConfigError

L = TypeVar("L")  # what ``load`` returns (a LoadedModel, or a verb's own bundle)
R = TypeVar("R")  # what ``work`` returns (the verb's result object)


def refuse_output(out: os.PathLike, overwrite: bool = False, inputs: Iterable[Any] = ()) -> Path:
    """``out`` as a Path, or one line saying why it cannot be written: it exists and ``overwrite``
    is off, or it is an input, lies inside one or holds one (replacing it would destroy the input).
    ``inputs`` are model specs; names that are no existing path (``tiny-llama``) never overlap."""
    from .manifest import overlaps_input

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    for spec in inputs:
        if overlaps_input(out, spec):
            raise ConfigError(f"--out {out} is the input {spec} (or inside it, or holds it), which must stay "
                              "intact: choose another --out")
    return out


class PhaseTimer:
    """Seconds per named phase; a phase entered twice adds up (e.g. ``work_s`` in two parts)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.timing: dict[str, float] = {}

    @contextmanager
    def phase(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timing[key] = self.timing.get(key, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        """Seconds since the timer was made (the whole step so far)."""
        return time.perf_counter() - self.started


@dataclass
class StepOutcome(Generic[L, R]):
    """What :func:`checkpoint_step` made: the verb's result, what was loaded (the written model),
    the manifest written, where, and the seconds per phase."""

    result: R
    loaded: L
    manifest: Any
    out: Path
    timing: dict[str, float] = field(default_factory=dict)


def checkpoint_step(out: os.PathLike, *, overwrite: bool = False, inputs: Iterable[Any] = (),
                    load: Callable[[], L], work: Callable[[L], R], manifest: Callable[[L, R], Any],
                    write_extra: Optional[Callable[[Path, R], None]] = None,
                    timer: Optional[PhaseTimer] = None) -> StepOutcome[L, R]:
    """Refuse a bad ``out``, ``load()``, ``work(loaded)``, ``manifest(loaded, result)``, then save
    ``loaded.model`` and ``loaded.tokenizer`` with that manifest atomically to ``out``.

    ``write_extra(tmp, result)`` writes the verb's own files into the temporary directory before the
    rename (so a killed run never leaves a checkpoint without them). ``manifest`` may change the
    model before it is saved (e.g. cast it to its storage dtype). Pass ``timer`` when the verb needs
    the elapsed time inside ``work`` (a report's ``total_s``); its phases are ``load_s``, ``work_s``,
    ``manifest_s``, ``save_s`` and ``total_s``. Errors raised by any callable propagate unchanged,
    and nothing is left at ``out``.
    """
    from .manifest import save_checkpoint

    timer = timer or PhaseTimer()
    out = refuse_output(out, overwrite, inputs)
    with timer.phase("load_s"):
        loaded = load()
    with timer.phase("work_s"):
        result = work(loaded)
    with timer.phase("manifest_s"):
        man = manifest(loaded, result)
    on_write = None if write_extra is None else (lambda tmp: write_extra(tmp, result))
    with timer.phase("save_s"):
        save_checkpoint(loaded.model, getattr(loaded, "tokenizer", None), out, man, overwrite=overwrite,
                        on_write=on_write)
    timer.timing["total_s"] = timer.elapsed()
    return StepOutcome(result, loaded, man, out, dict(timer.timing))
