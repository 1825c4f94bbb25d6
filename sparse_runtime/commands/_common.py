"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", nargs="?", default="smollm2-135m",
                       help="HF directory, .gguf file, 'smollm2-135m' (default) or tiny-llama|tiny-mistral|tiny-qwen2")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory (off by default)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="data directory (default: $SPARSE_RUNTIME_DATA, then the HF hub)")
    p.add_argument("--protocol", default="quick", help="measurement protocol: quick (default) or paper")


def add_out_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--out", required=required, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="where the model runs: cpu (default) or cuda[:N]; checkpoints are always written from the CPU")


def check_device(device) -> None:
    """A clear error before any loading when the named device is not there."""
    if not device or device == "cpu":
        return
    import torch

    from ..errors import ConfigError

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this PyTorch sees no CUDA device (torch {torch.__version__}); "
                          "use --device cpu or install a CUDA build of PyTorch")


def check_output(out, overwrite: bool = False, inputs=(), flag: str = "--out") -> None:
    """Refuse an output path that cannot work, before any loading or compute.

    Why here and not at the write: a read-only disk or a typo in ``--out`` should cost a second,
    not an hour of pruning or training. Checks: ``out`` is not the current directory (or above it),
    not an input (nor inside one, nor holding one: ``--overwrite`` would delete it), not a file; it
    does not exist unless ``overwrite``; and its nearest existing parent is a directory we can
    create entries in (probed with a hidden directory that is removed at once).
    """
    import os
    from pathlib import Path

    from ..errors import CheckpointExistsError, ConfigError

    if out is None:
        return
    if not str(out).strip():
        raise ConfigError(f"{flag} is empty: name a new directory, e.g. {flag} runs/NAME")
    p = Path(out).expanduser().absolute()
    real = Path(os.path.realpath(p))
    cwd = Path(os.path.realpath(Path.cwd()))
    if real == cwd or real in cwd.parents:
        raise ConfigError(f"{flag} {out} is the current directory (or one above it), which would be replaced: "
                          f"name a new directory, e.g. {flag} runs/NAME")
    from ..manifest import overlaps_input

    for spec in inputs:
        if overlaps_input(p, spec):
            raise ConfigError(f"{flag} {out} is the input {spec} (or inside it, or holds it), which must stay "
                              f"intact: choose another {flag}")
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise ConfigError(f"{flag} {out} is a file, not a directory: choose another {flag} or remove the file")
        if not overwrite:
            raise CheckpointExistsError(f"{out} already exists; choose another {flag} or pass --overwrite")
    parent = p.parent
    while not parent.exists():
        if parent.is_symlink():
            raise ConfigError(f"{flag} {out}: {parent} is a broken symbolic link: choose another {flag}")
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {out} cannot be created: {parent} is a file, not a directory; choose another {flag}")
    _probe_writable(parent, out, flag)


def check_output_file(path, flag: str = "--json") -> None:
    """The file form of :func:`check_output`: its directory exists and takes new files."""
    from pathlib import Path

    from ..errors import ConfigError

    if path is None:
        return
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a directory: give a file name, e.g. {flag} {Path(path) / 'out.json'}")
    if not p.parent.is_dir():
        raise ConfigError(f"{flag} {path}: its directory {p.parent} does not exist; create it or choose another path")
    _probe_writable(p.parent, path, flag)


def _probe_writable(parent, out, flag: str) -> None:
    import errno
    import os
    import tempfile

    from ..errors import ConfigError

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sparse-runtime-write-check-", dir=parent))
    except OSError as e:
        why = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable (permission denied)",
               errno.EPERM: "is not writable (permission denied)",
               errno.ENOSPC: "is on a full disk"}.get(e.errno, f"cannot be written ({e.strerror})")
        raise ConfigError(f"{flag} {out}: {parent} {why}; nothing was computed. Choose another {flag} "
                          "on a writable disk") from e
