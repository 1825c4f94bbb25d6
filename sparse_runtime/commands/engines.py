"""``sparse-runtime engines list`` / ``engines install deepsparse|llamacpp``: engines that are not
installed with the package: DeepSparse needs Python 3.11, onnx 1.14 and numpy<2, so it gets its own
venv; llama.cpp (llama-cpp-python) lives in the main environment but compiles for minutes."""
from __future__ import annotations

import importlib.metadata as md
from typing import Any, Callable

from ..registry import Registry
from . import Command

# The engines that live outside the main environment: name -> {"status": ..., "install": ...} (the
# engines themselves are runtime.ENGINES; these are the environments some of them need).
ENGINE_ENVIRONMENTS: Registry[dict[str, Callable]] = Registry("engine")


def _ort_status() -> dict[str, Any]:
    try:
        v = md.version("onnxruntime")
    except md.PackageNotFoundError:
        return {"engine": "onnxruntime", "installed": False, "hint": "pip install 'sparse-runtime[onnx]'"}
    return {"engine": "onnxruntime", "installed": True, "version": v, "where": "main environment"}


def _ort_install(args) -> dict[str, Any]:
    from ..errors import ConfigError

    raise ConfigError("onnxruntime lives in the main environment: pip install 'sparse-runtime[onnx]'")


def _ds_status() -> dict[str, Any]:
    from ..runtime import deepsparse_env

    return deepsparse_env.status()


def _ds_install(args) -> dict[str, Any]:
    from ..runtime import deepsparse_env

    return deepsparse_env.install(python=args.python, force=args.force)


LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"  # the version the gguf export and the llamacpp engine were tested with


def _llama_status() -> dict[str, Any]:
    from ..runtime.llamacpp_model import llama_cpp_available

    ok, why = llama_cpp_available()
    if not ok:
        return {"engine": "llamacpp", "installed": False, "hint": why}
    return {"engine": "llamacpp", "installed": True, "version": md.version("llama_cpp_python"),
            "where": "main environment"}


def _llama_install(args) -> dict[str, Any]:
    """pip-install the tested llama-cpp-python into this environment: it compiles llama.cpp for this
    CPU (-march=native, OpenMP), a few minutes on 2 cores."""
    import subprocess
    import sys

    from ..errors import ConfigError

    st = _llama_status()
    if st["installed"] and not args.force:
        return {**st, "path": sys.prefix}
    print(f"compiling llama.cpp for this CPU ({LLAMA_CPP_PIN}; about 4 minutes on 2 cores) ...", flush=True)
    # --no-cache-dir: a wheel pip cached on another CPU was compiled for that CPU (-march=native)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir", LLAMA_CPP_PIN] + \
        (["--force-reinstall"] if args.force else [])
    if subprocess.call(cmd) != 0:
        raise ConfigError(f"pip install {LLAMA_CPP_PIN} failed (it needs a C++ compiler and cmake); its output "
                          "is above")
    return {**_llama_status(), "path": sys.prefix}


ENGINE_ENVIRONMENTS.register("onnxruntime")({"status": _ort_status, "install": _ort_install})
ENGINE_ENVIRONMENTS.register("llamacpp")({"status": _llama_status, "install": _llama_install})
ENGINE_ENVIRONMENTS.register("deepsparse")({"status": _ds_status, "install": _ds_install})


def add_arguments(p):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="show each engine, where it lives and whether it is installed")
    ins = sub.add_parser("install", help="install an engine (deepsparse: its own venv; llamacpp: compiles llama.cpp)")
    ins.add_argument("engine", help="deepsparse or llamacpp")
    ins.add_argument("--python", default=None, help="Python 3.11 interpreter for the DeepSparse venv")
    ins.add_argument("--force", action="store_true", help="reinstall even if present")


def run(args) -> int:
    if args.action == "list":
        for name in ENGINE_ENVIRONMENTS:
            st = ENGINE_ENVIRONMENTS.get(name)["status"]()
            state = "installed" if st.get("installed") else "not installed"
            extra = ", ".join(f"{k} {v}" for k, v in st.items() if k in ("version", "deepsparse", "python", "path", "where"))
            print(f"{name}: {state}" + (f" ({extra})" if extra else ""))
            if st.get("licence"):
                print(f"  licence: {st['licence']}")
            if not st.get("installed"):
                print(f"  install: sparse-runtime engines install {name}" if name in ("deepsparse", "llamacpp")
                      else f"  {st.get('hint', '')}")
        return 0
    install = ENGINE_ENVIRONMENTS.get(args.engine)["install"]
    if getattr(args, "python", None):
        import shutil
        from pathlib import Path

        from ..errors import ConfigError

        if not (Path(args.python).is_file() or shutil.which(args.python)):
            raise ConfigError(f"--python {args.python}: no such interpreter; give the path of a Python 3.11 "
                              "executable (e.g. --python python3.11)")
    st = install(args)
    if args.engine == "deepsparse":
        print(f"{args.engine}: installed in {st.get('path')} (deepsparse {st.get('deepsparse')}, "
              f"python {st.get('python')})")
        print(f"  licence: {st.get('licence')}")
    else:
        print(f"{args.engine}: installed in {st.get('path')} (version {st.get('version')})")
    return 0


COMMAND = Command("engines", "list or install inference engines not installed with the package (deepsparse, llamacpp)",
                  add_arguments, run)
