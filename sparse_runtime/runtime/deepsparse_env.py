"""DeepSparse in its own virtual environment.

Why a separate env: the only DeepSparse that installs is 1.8.0 (1.9.0 is an end-of-life stub); it
needs Python <= 3.11 and pins ``onnx==1.14.1`` and ``numpy<2``, which would break the main env
(onnx 1.2x, numpy 2). So it lives in ``$SPARSE_RUNTIME_CACHE/engines/deepsparse`` (a python3.11
venv) and the main process talks to it through a small worker script
(:mod:`sparse_runtime.runtime.deepsparse_worker`) over JSON on stdin/stdout.

Rules this module enforces:
- ``NM_DISABLE_ANALYTICS=1`` in every DeepSparse process (it phones home on import and on engine
  creation otherwise);
- the worker always compiles a COPY of the .onnx: ``deepsparse.Engine`` rewrites the file it gets;
- licence: the DeepSparse Community License allows evaluation in development and testing, NOT
  production use. Neural Magic deprecated DeepSparse in June 2025; it is a frozen legacy baseline.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import SparseRuntimeError
from ..models.loading import cache_dir

DEEPSPARSE_VERSION = "1.8.0"
PYTHON_VERSION = "3.11"
LICENCE = ("DeepSparse Community License: evaluation in development and testing only, not production use "
           "(DeepSparse was deprecated by Neural Magic in June 2025)")
MARKER = "sparse-runtime-engine.json"
TAG = "@@SPARSE-RUNTIME-RESULT@@"
INSTALL_HINT = "sparse-runtime engines install deepsparse"


class EngineNotInstalledError(SparseRuntimeError):
    """An engine that lives in its own environment and has not been installed yet."""


def env_dir() -> Path:
    return cache_dir() / "engines" / "deepsparse"


def python_path(root: Optional[Path] = None) -> Path:
    return (root or env_dir()) / "bin" / "python"


def is_installed() -> bool:
    return python_path().exists() and (env_dir() / MARKER).is_file()


def status() -> dict[str, Any]:
    d = env_dir()
    info: dict[str, Any] = {"engine": "deepsparse", "path": str(d), "installed": is_installed(), "licence": LICENCE}
    if info["installed"]:
        try:
            info.update(json.loads((d / MARKER).read_text()))
        except (OSError, json.JSONDecodeError):
            info["installed"] = False
    return info


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["NM_DISABLE_ANALYTICS"] = "1"
    env.pop("PYTHONPATH", None)  # nothing from the main env may leak in
    return env


def find_python(python: Optional[str] = None) -> str:
    if python:
        return python
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    found = shutil.which("python3.11")
    if not found:
        raise SparseRuntimeError("DeepSparse 1.8 needs Python 3.11, and no python3.11 is on PATH; install one "
                                 "(e.g. with pyenv) or pass --python /path/to/python3.11")
    return found


def install(python: Optional[str] = None, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Create the venv and pip-install ``deepsparse==1.8.0`` into it (about a minute).

    The venv is built at its final path: a venv's scripts (``pip``, ``activate``,
    ``deepsparse.benchmark``) carry its absolute path, so one built under a temporary name and
    renamed would point at a directory that no longer exists. The marker file is written last, so
    :func:`is_installed` never sees a half-built env; a previous env is moved aside meanwhile and
    put back if the new one fails.
    """
    target = env_dir()
    if is_installed() and not force:
        return status()
    py = find_python(python)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target.with_name(target.name + ".partial"), ignore_errors=True)  # older releases' temp
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    say = (lambda *_: None) if quiet else (lambda m: print(m, flush=True))

    def fail(message: str) -> SparseRuntimeError:
        shutil.rmtree(target, ignore_errors=True)
        if old.exists():
            os.replace(old, target)
        return SparseRuntimeError(message)

    try:
        say(f"creating {target} with {py}")
        subprocess.run([py, "-m", "venv", str(target)], check=True, env=_env())
        say(f"pip install deepsparse=={DEEPSPARSE_VERSION} (pins onnx 1.14.1, numpy<2) ...")
        t0 = time.perf_counter()
        r = subprocess.run([str(python_path(target)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            f"deepsparse=={DEEPSPARSE_VERSION}"], env=_env(), capture_output=True, text=True)
        if r.returncode:
            tail = ((r.stderr or r.stdout).strip().splitlines() or [""])[-1]
            raise fail(f"installing deepsparse failed (pip exit {r.returncode}): {tail}")
        probe = subprocess.run([str(python_path(target)), "-c", "import deepsparse, onnx, numpy, sys; "
                                "print(deepsparse.__version__, onnx.__version__, numpy.__version__, "
                                "sys.version.split()[0])"], env=_env(), capture_output=True, text=True)
        if probe.returncode:
            raise fail(f"deepsparse installed but does not import: {probe.stderr.strip()[-300:]}")
    except (OSError, subprocess.CalledProcessError) as e:
        raise fail(f"creating the DeepSparse environment in {target} failed: {e}") from e
    except KeyboardInterrupt:
        fail("interrupted")
        raise
    ds, onnx_v, np_v, py_v = probe.stdout.split()[-4:]
    marker = {"deepsparse": ds, "onnx": onnx_v, "numpy": np_v, "python": py_v, "installed_seconds":
              round(time.perf_counter() - t0, 1), "licence": LICENCE}
    tmp = target / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, target / MARKER)
    shutil.rmtree(old, ignore_errors=True)
    say(f"installed DeepSparse {ds} in {target}. {LICENCE}")
    return status()


def run_worker(request: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Send one request to the worker in the DeepSparse env and return its JSON answer."""
    if not is_installed():
        raise EngineNotInstalledError(f"DeepSparse is not installed (looked in {env_dir()}); run `{INSTALL_HINT}` "
                                      "to create its own Python 3.11 environment")
    worker = Path(__file__).with_name("deepsparse_worker.py")
    try:
        r = subprocess.run([str(python_path()), str(worker)], input=json.dumps(request), capture_output=True,
                           text=True, env=_env(), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise SparseRuntimeError(f"the DeepSparse worker did not answer within {timeout:.0f} s") from e
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(TAG):
            res = json.loads(line[len(TAG):])
            if "error" in res:
                raise SparseRuntimeError(f"DeepSparse failed: {res['error']}")
            return res
    raise SparseRuntimeError(f"the DeepSparse worker exited with {r.returncode} and no result: "
                             f"{(r.stderr or r.stdout).strip()[-500:]}")


def engine_info() -> dict[str, Any]:
    return run_worker({"action": "info"}, timeout=300)
