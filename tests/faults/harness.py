"""The fault-injection harness: run the command line, then check the four promises of a failure.

Every case asserts (1) the exit code, (2) exactly one error line, matching a pattern that names
the fix, (3) no traceback, and (4) that every file that existed before (inputs, earlier outputs,
the shared fixtures) is byte-identical afterwards and nothing new is left visible or hidden.

Cases run in-process (``cli.main(argv)``; a subprocess costs 3-4 s of imports on 2 cores, which
120 cases cannot afford); the kill -9 cases need a real process and use :func:`run_subprocess`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
ERROR_LINE = re.compile(r"^(sparse-runtime[\w -]*: )?error: ")


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if ERROR_LINE.match(line)]


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file (hidden ones too) and the name of every directory under ``roots``."""
    out: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for d in dirnames:
                out[os.path.join(dirpath, d)] = "dir"
            for f in filenames:
                p = os.path.join(dirpath, f)
                if os.path.islink(p):
                    out[p] = "link:" + os.readlink(p)
                else:
                    with open(p, "rb") as fh:
                        out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    changes = []
    for k in sorted(set(before) | set(after)):
        if k not in after:
            changes.append(f"removed {k}")
        elif k not in before:
            changes.append(f"created {k}")
        elif before[k] != after[k]:
            changes.append(f"changed {k}")
    return changes


def run_inprocess(argv: Sequence[str], capsys) -> Result:
    """``cli.main(argv)`` with stdout/stderr captured (argparse's SystemExit becomes its code).

    An exception escaping ``main`` is what a user would see as a traceback: it is formatted into
    ``err`` so the no-traceback check fails with the traceback in the message."""
    from sparse_runtime.cli import main

    capsys.readouterr()
    tb = ""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    except BaseException:  # noqa: BLE001 - record it as the user would see it
        import traceback

        tb = traceback.format_exc()
        rc = -1
    cap = capsys.readouterr()
    return Result(int(rc), cap.out, cap.err + tb)


def run_subprocess(argv: Sequence[str], *, env: Optional[dict] = None, cwd: Optional[Path] = None,
                   timeout: float = 300) -> Result:
    """The console entry point in a fresh process (real exit codes and signals)."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "sparse_runtime.cli", *[str(a) for a in argv]], env=e,
                       cwd=str(cwd or REPO), capture_output=True, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def assert_one_line(res: Result, rc: int, pattern: str) -> None:
    """Exit code ``rc``, exactly one error line matching ``pattern`` (which names the fix), no traceback."""
    assert "Traceback" not in res.err and "Traceback" not in res.out, f"traceback:\n{res.err[-3000:]}{res.out[-1000:]}"
    assert res.rc == rc, f"exit {res.rc}, expected {rc}; stderr:\n{res.err[-2000:]}"
    lines = res.error_lines
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{res.err[-2000:]}"
    assert re.search(pattern, lines[0]), f"{lines[0]!r} does not match {pattern!r}"


# -- real faults: tiny tmpfs mounts (we run as root, so permission bits would not stop a write) -----

_MOUNT_OK: Optional[bool] = None


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN, e.g. the CI container)."""
    global _MOUNT_OK
    if _MOUNT_OK is None:
        d = Path(tempfile.mkdtemp(prefix="sr-mount-probe-"))
        try:
            _MOUNT_OK = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                                       capture_output=True).returncode == 0
            if _MOUNT_OK:
                subprocess.run(["umount", str(d)], check=True)
        except OSError:
            _MOUNT_OK = False
        finally:
            with contextlib.suppress(OSError):
                d.rmdir()
    return _MOUNT_OK


@contextlib.contextmanager
def tmpfs(where: Path, *, size: str = "1m", readonly: bool = False, fill: bool = False):
    """A tmpfs at ``where``: read-only, or full (a filler file takes all but a few KiB)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        if fill:
            fill_up(where)
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_up(where: Path) -> None:
    """Fill the file system holding ``where`` to the last page (a hidden ``.filler`` file)."""
    fd = os.open(where / ".filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        block = b"\0" * 65536
        while True:
            try:
                os.write(fd, block)
            except OSError:
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)


# -- the same faults injected in-process (when mounting is impossible) ------------------------------

@contextlib.contextmanager
def injected(root: Path, code: int, monkeypatch):
    """Writes under ``root`` fail with ``OSError(code)`` (ENOSPC: file writes; EROFS: also mkdir).

    Covers Python's ``open``/``os.open``/``os.mkdir`` and the two native writers the package uses
    (safetensors' ``save_file``, ``torch.save``)."""
    import builtins

    root = str(Path(root).resolve())
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def under(p) -> bool:
        try:
            return os.path.realpath(os.fspath(p)).startswith(root)
        except TypeError:
            return False

    def fail(p):
        raise OSError(code, os.strerror(code), os.fspath(p))

    def fake_open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and under(file):
            fail(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            fail(path)
        return real_os_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):
        if code == errno.EROFS and under(path):
            fail(path)
        return real_mkdir(path, *a, **k)

    def guard(fn):
        def wrapper(obj, filename, *a, **k):
            if isinstance(filename, (str, os.PathLike)) and under(filename):
                fail(filename)
            return fn(obj, filename, *a, **k)
        return wrapper

    import safetensors.torch as st
    import torch

    import io

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # pathlib's Path.open/write_text
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(st, "save_file", guard(st.save_file))
    monkeypatch.setattr(torch, "save", guard(torch.save))
    with contextlib.suppress(ImportError, AttributeError):
        import transformers.modeling_utils as mu

        monkeypatch.setattr(mu, "safe_save_file", guard(mu.safe_save_file))
    try:
        yield
    finally:
        monkeypatch.undo()


@dataclass
class Case:
    """One row of the table: ``argv`` (``{P}``-style placeholders, see ``Fixtures.fmt``), an optional
    ``setup(ctx)`` that makes the bad input, the expected exit code and error-line pattern, and
    ``env``/``cwd`` overrides. ``xfail``: the reason, when the fix is another change's."""
    id: str
    argv: list[str]
    pattern: str
    rc: int = 2
    setup: Optional[Callable] = None
    env: dict = field(default_factory=dict)
    cwd: Optional[str] = None
    xfail: Optional[str] = None
    slow: bool = False
