"""Adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

The config names the method, its options, the base model it was trained on and that base's
*mask fingerprint* (SHA-256 over every layer's mask digest). Loading an adapter onto a model whose
masks differ is refused: its update would be merged under the wrong mask.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ManifestError
from ..manifest import write_file_atomic
from ..sparsity import mask_digest
from .base import FINETUNE_METHODS, adapter_state_dict, attach_adapters, load_adapter_state_dict

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT = "sparse-runtime/adapter"


def mask_fingerprint(model, family=None, manifest=None) -> str:
    """SHA-256 over (layer name, mask digest) of every block linear; from the manifest when given
    (it was verified against the weights on load), else measured."""
    from ..models.family import family_of

    h = hashlib.sha256()
    if manifest is not None and manifest.layers:
        for name in sorted(manifest.layers):
            h.update(f"{name}={manifest.layers[name].mask_sha256};".encode())
        return h.hexdigest()
    family = family or family_of(model)
    for name, lin in sorted(family.iter_linears(model), key=lambda t: t[0]):
        h.update(f"{name}={mask_digest(lin.weight.detach() != 0)};".encode())
    return h.hexdigest()


def save_adapter(model, out_dir: os.PathLike, method: str, adapter_cfg, *, base_model: str, fingerprint: str,
                 extra: Optional[dict[str, Any]] = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model)
    tmp = out / f".{ADAPTER_WEIGHTS}.tmp-{os.getpid()}"
    save_file({k: v.cpu() for k, v in state.items()}, str(tmp))
    os.replace(tmp, out / ADAPTER_WEIGHTS)
    meta = {"format": ADAPTER_FORMAT, "version": 1, "method": method, "config": adapter_cfg.to_dict(),
            "base_model": _portable_base(base_model, out), "base_mask_fingerprint": fingerprint,
            "trainable_parameters": int(sum(v.numel() for k, v in state.items())), **(extra or {})}
    write_file_atomic(out / ADAPTER_CONFIG, json.dumps(meta, indent=1, default=str))
    return out


def _portable_base(base_model: str, out: Path) -> str:
    from ..merge import portable_base  # relative to the adapter directory: merge finds it from anywhere

    return portable_base(base_model, out)


def read_adapter_config(path: os.PathLike) -> dict[str, Any]:
    p = Path(path)
    f = p / ADAPTER_CONFIG
    if not f.is_file():
        raise ManifestError(f"{p} holds no {ADAPTER_CONFIG}: it is not a sparse-runtime adapter directory "
                            "(the output of `sparse-runtime finetune`)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{f} is not valid JSON ({e})") from e
    if meta.get("format") != ADAPTER_FORMAT:
        raise ManifestError(f"{f} is not a sparse-runtime adapter config")
    return meta


def load_adapter_weights(path: os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = Path(path) / ADAPTER_WEIGHTS
    if not f.is_file():
        raise ManifestError(f"{f} is missing: the fine-tune did not finish (resume it with --resume)")
    return load_file(str(f))


def attach_saved_adapter(model, family, adapter_dir: os.PathLike, manifest=None, check_fingerprint: bool = True):
    """Attach the adapters described in ``adapter_dir`` to ``model`` and load their weights."""
    meta = read_adapter_config(adapter_dir)
    spec = FINETUNE_METHODS.get(meta["method"])
    cfg = spec.config_cls.from_dict(meta["config"])
    if check_fingerprint:
        fp = mask_fingerprint(model, family, manifest)
        if fp != meta.get("base_mask_fingerprint"):
            raise ManifestError(f"the adapter in {adapter_dir} was trained on a model with other sparsity masks "
                                f"(base {meta.get('base_model')!r}); pass that model as --base")
    adapters = attach_adapters(model, spec, cfg, family)
    load_adapter_state_dict(model, load_adapter_weights(adapter_dir))
    return adapters, meta
