"""The resumable job queue of the long benchmarks: a registry of named configurations run a few per
invocation, each in a fresh worker process, with their rows merged into one saved table that fills
in over several sessions.

Why each piece exists:

- :func:`select_names`: ``--configs`` takes names, shell patterns (``*@wanda-50``), ``all`` or
  ``missing`` (what the saved table lacks), so a session can pick up where the last one stopped;
- :class:`WorkDir`: a work directory shared by invocations (cached bases, training runs) with
  named file locks, so two invocations (or ``--jobs`` threads) never prepare the same base twice
  or write the table at once;
- :func:`spawn_worker`: a configuration runs in its own process, because peak memory is only
  comparable per process (the allocator keeps freed memory); ``os.wait4`` gives that child's own
  peak RSS;
- :func:`load_table`: the saved rows, refused when they belong to another model or protocol (a
  table must never mix them);
- :func:`run_queue`: one at a time, or ``jobs`` at once (each thread waits on one child process).

``benchmarks/bench_ft_quick.py`` is built on it. Scripts import it as ``from _scheduler import ...``
(Python puts the script's folder on ``sys.path``).
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def slug(text: str) -> str:
    """A file-name-safe form of ``text`` (configuration names hold ``@``, ``:`` and ``%``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def model_slug(model: str) -> str:
    """``smollm2-135m`` as it is; a model directory by its last component."""
    return slug(Path(model).name if (os.sep in str(model) or Path(str(model)).exists()) else model)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` so that ``path`` is complete or absent (a killed run leaves the older file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


class WorkDir:
    """A work directory shared by invocations, with named locks under ``locks/``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive lock across processes and threads (``flock`` on ``locks/<name>.lock``)."""
        import fcntl

        d = self.root / "locks"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{slug(name)}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def select_names(spec: Optional[str], names: Sequence[str], is_missing: Callable[[str], bool]) -> list[str]:
    """The configurations a ``--configs`` value names, in the registry's order per token, each once.

    Tokens (comma-separated): a name, a shell pattern, ``all``, or ``missing`` (``is_missing(name)``).
    An unknown name or a pattern matching nothing exits with one line listing the choices."""
    if not spec:
        return []
    out: list[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        if tok == "all":
            hit = list(names)
        elif tok == "missing":
            hit = [c for c in names if is_missing(c)]
        else:
            hit = [c for c in names if fnmatch.fnmatchcase(c, tok)]
        if not hit and tok != "missing":
            raise SystemExit(f"unknown configuration {tok!r}; choose from: {', '.join(names)} (or all, missing, "
                             "a pattern such as '*@wanda-50')")
        out += [h for h in hit if h not in out]
    return out


def spawn_worker(cmd: Sequence[str], log_path: Optional[Path] = None, cwd: Path = ROOT) -> tuple[int, float, float]:
    """Run ``cmd`` in a fresh process; return (exit code, wall s, peak RSS MiB of that child alone).

    Its output goes to the terminal, or appended to ``log_path`` (concurrent workers: one log each
    instead of interleaved progress bars). ``SPARSE_RUNTIME_DATA`` defaults to ``../shared/data``
    beside the repository when that exists, as the Makefile sets it."""
    env = dict(os.environ)
    shared = ROOT.parent / "shared" / "data"
    if "SPARSE_RUNTIME_DATA" not in env and shared.is_dir():
        env["SPARSE_RUNTIME_DATA"] = str(shared)
    log = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a")
    t0 = time.perf_counter()
    try:
        p = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except KeyboardInterrupt:
            p.wait()
            raise
    finally:
        if log is not None:
            log.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.perf_counter() - t0, ru.ru_maxrss / 1024.0


def load_table(path: Path, expect: dict[str, Any], replace: bool = False) -> list[dict[str, Any]]:
    """The rows saved at ``path`` (a ``save_results`` JSON), or none with ``replace`` or no file.

    ``expect`` are keys of the file's ``bench`` header (model, protocol) the rows must share; a
    table of another model or protocol exits with one line naming the fix."""
    if replace or not path.is_file():
        return []
    data = json.loads(path.read_text())
    b = data.get("bench", {})
    if any(b.get(k) != v for k, v in expect.items()):
        have = " / ".join(repr(b.get(k)) for k in expect)
        want = " / ".join(repr(v) for v in expect.values())
        raise SystemExit(f"{path} holds {have}, not {want}: choose another --name, or --replace to start it over")
    return list(data.get("rows", []))


def run_queue(names: Iterable[str], one: Callable[[int, str], None], jobs: int = 1) -> None:
    """``one(i, name)`` for each name (``i`` from 1), ``jobs`` at a time; an exception in one stops
    the queue after the running ones (``one`` reports ordinary failures itself)."""
    items = list(enumerate(names, 1))
    if jobs <= 1:
        for i, name in items:
            one(i, name)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each thread waits on one child process
        for f in [pool.submit(one, i, n) for i, n in items]:
            f.result()
