"""The model an export starts from: loaded once, described once.

An export's input is a sparse-runtime checkpoint (HF directory + ``sparsity_manifest.json``) or any
:func:`sparse_runtime.load_model` spec (a tiny test model, ``smollm2-135m``, a plain HF directory).
The model is always loaded in float32: it is the *reference* every export is verified against, and
the exporter casts to the requested dtype itself.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from sparse_runtime.manifest import MANIFEST_NAME, Manifest, build_manifest
from sparse_runtime.models import LoadedModel, load_model
from sparse_runtime.models.streaming import SIDE_FILES
from sparse_runtime.sparsity import detect_nm

# Files copied verbatim from a source HF directory into exports that keep the HF layout.
HF_SIDE_FILES = ("config.json", *SIDE_FILES)  # config, generation config and tokenizer files


@dataclass
class Source:
    spec: str
    loaded: LoadedModel
    manifest: Manifest  # read from the checkpoint, or measured from the weights
    manifest_from_checkpoint: bool
    sparsity_manifest_sha256: Optional[str]  # digest of the checkpoint's sparsity_manifest.json bytes
    _tmp: list = field(default_factory=list)

    @property
    def model(self):
        return self.loaded.model

    @property
    def family(self):
        return self.loaded.family

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def masks_sha256(self) -> str:
        """One digest over every layer's mask digest: identifies the sparsity pattern of the source
        even when it came without a manifest (a tiny model, a plain HF directory)."""
        h = hashlib.sha256()
        for name in sorted(self.manifest.layers):
            h.update(f"{name}={self.manifest.layers[name].mask_sha256};".encode())
        return h.hexdigest()

    def linears(self) -> dict[str, torch.nn.Linear]:
        return dict(self.family.iter_linears(self.model))

    def hf_dir(self) -> Path:
        """A Hugging Face directory holding exactly these weights (the checkpoint itself, or a
        temporary save of an in-memory model) for tools that read from disk (optimum)."""
        p = self.loaded.path
        if p is not None and (Path(p) / "config.json").is_file():
            return Path(p)
        tmp = Path(tempfile.mkdtemp(prefix="sr-export-src-"))
        self._tmp.append(tmp)
        self.model.save_pretrained(tmp, safe_serialization=True)
        tok = self.tokenizer
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(tmp)
        return tmp

    def copy_side_files(self, dest: Path, skip: tuple[str, ...] = ()) -> list[str]:
        """Copy config, generation config and tokenizer files into ``dest``."""
        src = self.hf_dir()
        copied = []
        for name in HF_SIDE_FILES:
            if name in skip or not (src / name).is_file() or (dest / name).exists():
                continue
            shutil.copy2(src / name, dest / name)
            copied.append(name)
        return copied

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "spec": self.spec,
            "path": str(self.loaded.path) if self.loaded.path else None,
            "family": self.family.name,
            "model_type": getattr(self.model.config, "model_type", None),
            "base_model": m.base_model or self.spec,
            "sparsity_manifest": MANIFEST_NAME if self.manifest_from_checkpoint else None,
            "sparsity_manifest_sha256": self.sparsity_manifest_sha256,
            "masks_sha256": self.masks_sha256,
            "total_sparsity": m.total_measured,
            "layers": len(m.layers),
            "structures": sorted({r.structure for r in m.layers.values()}),
        }

    def cleanup(self) -> None:
        for t in self._tmp:
            shutil.rmtree(t, ignore_errors=True)
        self._tmp.clear()


def load_source(spec, trust_remote_code: bool = False, dtype: str = "float32") -> Source:
    """The source model loaded in ``dtype`` (the compute dtype; the stored one is the exporter's)."""
    loaded = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    digest = None
    if loaded.manifest is not None:
        manifest, from_ckpt = loaded.manifest, True
        f = Path(loaded.path) / MANIFEST_NAME
        if f.is_file():
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
    else:
        # No manifest: measure one, naming the N:M structure the weights happen to follow.
        structures = {}
        for name, lin in loaded.family.iter_linears(loaded.model):
            w = lin.weight.detach()
            found = detect_nm(w, ("2:4",)) if (w == 0).any() else []
            structures[name] = found[0] if found else "unstructured"
        manifest, from_ckpt = build_manifest(loaded.model, loaded.family, structures=structures,
                                             base_model=str(spec)), False
    return Source(str(spec), loaded, manifest, from_ckpt, digest)


def dense_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers that are saved, with tied tensors stored once (as
    ``save_pretrained`` does), contiguous and on CPU."""
    sd = model.state_dict()
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = {k for k in sd if k.endswith("lm_head.weight")}
    out, seen = {}, {}
    for k, v in sd.items():
        if k in tied:
            continue
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            continue
        seen[key] = k
        out[k] = v.detach().cpu().contiguous()
    # non-persistent buffers (rotary inv_freq) are not in state_dict; nothing else to drop
    return out


def json_dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str, sort_keys=False)
