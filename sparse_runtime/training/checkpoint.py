"""Resumable training checkpoints: ``<run>/checkpoints/step-NNNNNN/``.

Each holds everything a resume needs to continue the *same* loss curve:
- ``adapter_model.safetensors``: the adapters' parameters and persistent buffers;
- ``optimizer.pt``: AdamW and LambdaLR state dicts (tensors, numbers, lists only; read back with
  ``torch.load(weights_only=True)``, so a checkpoint cannot run code);
- ``rng-rank<R>.pt``: each process's torch (and CUDA) RNG state and Python ``random`` state;
- ``trainer_state.json``: step, sequences consumed (the data position), tokens, the loss log so
  far, method callbacks' state, and the run identity (method, adapter options, base-mask
  fingerprint, data and optimisation settings). A resume with another identity is refused.
Written atomically (temporary directory + rename, every process's files inside it before the
rename); the oldest are pruned to ``keep``.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ConfigError, ManifestError
from ..manifest import atomic_directory, make_temporary_beside, replace_directory

STATE = "trainer_state.json"
FORMAT = "sparse-runtime/train-checkpoint"


def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    root = Path(run_dir) / "checkpoints"
    found = sorted(p for p in root.glob("step-*") if (p / STATE).is_file()) if root.is_dir() else []
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, *, model, optimizer, scheduler, state: dict[str, Any],
                    rank: int = 0, world: int = 1, keep: int = 2, barrier=None) -> Path:
    """Rank 0 writes the shared parts; every rank writes its RNG file (after a barrier)."""
    from safetensors.torch import save_file

    from ..adapters import adapter_state_dict

    target = checkpoint_dir(run_dir, step)

    def write_shared(tmp: Path) -> None:
        save_file({k: v.cpu() for k, v in adapter_state_dict(model).items()}, str(tmp / "adapter_model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng-rank0.pt")
        (tmp / STATE).write_text(json.dumps({"format": FORMAT, **state}, indent=1, default=str))

    if world <= 1:
        with atomic_directory(target, overwrite=True) as tmp:
            write_shared(tmp)
    else:
        # every process writes its RNG file into the same temporary directory BEFORE the rename,
        # so a checkpoint directory that exists always holds every process's state
        name = [str(make_temporary_beside(target)) if rank == 0 else ""]
        torch.distributed.broadcast_object_list(name, src=0)
        tmp = Path(name[0])
        try:
            if rank == 0:
                write_shared(tmp)
            else:
                torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
            if barrier:
                barrier()
            if rank == 0:
                replace_directory(tmp, target)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if barrier:
            barrier()
    if rank == 0:
        olds = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*"))
        for p in olds[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return target


def read_state(ckpt: Path) -> dict[str, Any]:
    f = Path(ckpt) / STATE
    if not f.is_file():
        raise ManifestError(f"{ckpt} is not a sparse-runtime training checkpoint (no {STATE})")
    try:
        st = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{f} is corrupt: {e}") from e
    if st.get("format") != FORMAT:
        raise ManifestError(f"{f} is not a sparse-runtime training checkpoint")
    return st


def check_identity(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise ManifestError(f"cannot resume from {where}: it is a foreign checkpoint (another model, method, data "
                            f"or settings): " + "; ".join(diffs[:4]) + ". Start a fresh run (--overwrite) or "
                            "resume with the original settings")


def load_checkpoint(ckpt: Path, *, model, optimizer, scheduler, rank: int = 0) -> dict[str, Any]:
    from safetensors.torch import load_file

    from ..adapters import load_adapter_state_dict

    ckpt = Path(ckpt)
    st = read_state(ckpt)
    load_adapter_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng_file = ckpt / f"rng-rank{rank}.pt"
    if not rng_file.is_file():
        raise ConfigError(f"{ckpt} has no RNG state for process {rank}: it was written by a run with fewer "
                          "processes; resume with the same number of processes")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return st
