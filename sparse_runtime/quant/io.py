"""The quantized checkpoint's side file: ``quantization.safetensors`` beside the model's weights.

A quantized checkpoint is a normal Hugging Face directory whose weights are the DEQUANTIZED float32
values (so every tool, plain transformers included, evaluates exactly the quantized model), plus:

- ``quantization.safetensors``: ``<param name>.scales`` (float32 ``[N, G]``) and, for an
  asymmetric scheme, ``<param name>.zeros`` for every quantized weight; its metadata names the
  scheme (so the file is readable alone);
- the sparsity manifest's ``extra["quantization"]`` record: ``scheme``, ``method``, ``layers``,
  ``rounded_to_zero``, ``lm_head`` (written by :mod:`sparse_runtime.quant.apply`).

The codes are not stored: ``codes_from(W, scales, zeros, scheme, W != 0)`` recovers them exactly
from the stored values (``q * s / s`` rounds back to ``q``). A kept weight whose value rounds to 0
is stored as the float32 smallest normal number (1.2e-38, far below any output's rounding), so
``W != 0`` is still the mask, the manifest's digests and N:M hold, and its code reads back as the
zero point (docs/quantization.md#format).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ManifestError
from .scheme import QuantizedWeight, QuantScheme, codes_from

QUANT_FILE = "quantization.safetensors"
QUANT_FORMAT = "sparse-runtime/quantization"


def write_quantization(directory: os.PathLike, scheme: QuantScheme,
                       params: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]],
                       aliases: Optional[dict[str, str]] = None) -> Path:
    """Write ``params`` (``{param name: (scales, zeros | None)}``) to ``directory/quantization.safetensors``.
    ``aliases`` (``{other name: param name}``, e.g. a tied embedding -> ``lm_head.weight``) go into
    the metadata. Called inside the checkpoint's temporary directory (the rename makes it visible)."""
    import json

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, (scales, zeros) in params.items():
        tensors[f"{name}.scales"] = scales.detach().float().contiguous().cpu()
        if zeros is not None:
            tensors[f"{name}.zeros"] = zeros.detach().float().contiguous().cpu()
    meta = {"format": QUANT_FORMAT, "version": "1", "scheme": scheme.name, "aliases": json.dumps(aliases or {})}
    path = Path(directory) / QUANT_FILE
    save_file(tensors, str(path), metadata=meta)
    return path


@dataclass
class QuantizationInfo:
    """What a quantized checkpoint says about its quantization; ``scales_for(name)`` reads one weight's grid."""

    path: Path
    scheme: QuantScheme
    record: dict[str, Any] = field(default_factory=dict)  # the manifest's extra["quantization"] ({} if none)
    aliases: dict[str, str] = field(default_factory=dict)
    names: tuple[str, ...] = ()

    @property
    def method(self) -> Optional[str]:
        return self.record.get("method")

    @property
    def layers(self) -> list[str]:
        return list(self.names)

    def _resolve(self, param_name: str) -> str:
        name = param_name if param_name.endswith(".weight") or param_name in self.names else param_name + ".weight"
        return self.aliases.get(name, name)

    def scales_for(self, param_name: str) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """``(scales, zeros | None)`` of ``param_name`` (``model.layers.0.mlp.up_proj.weight``; the
        module name without ``.weight`` works too), or None when that weight is not quantized."""
        from safetensors import safe_open

        name = self._resolve(param_name)
        if name not in self.names:
            return None
        with safe_open(str(self.path), framework="pt") as f:
            keys = set(f.keys())
            zeros = f.get_tensor(f"{name}.zeros") if f"{name}.zeros" in keys else None
            return f.get_tensor(f"{name}.scales"), zeros

    def quantized(self, param_name: str, weight: torch.Tensor) -> Optional[QuantizedWeight]:
        """The codes of a stored (dequantized) ``weight`` on its grid, mask ``weight != 0``; None if not quantized."""
        grid = self.scales_for(param_name)
        if grid is None:
            return None
        return codes_from(weight, grid[0], grid[1], self.scheme, weight != 0)


def read_quantization(model_dir: os.PathLike) -> Optional[QuantizationInfo]:
    """The quantization of the checkpoint at ``model_dir``, or None when it has no side file (an
    unquantized checkpoint; also one whose weights a later step changed, since steps do not copy
    the side file). A side file that is not ours, or that disagrees with the manifest's record,
    is an error in one line."""
    import json

    from safetensors import safe_open

    d = Path(model_dir)
    path = d / QUANT_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ManifestError(f"{path} is not a readable safetensors file ({e}); the checkpoint is corrupt: "
                            "quantize the unquantized checkpoint again") from e
    if meta.get("format") != QUANT_FORMAT:
        raise ManifestError(f"{path} is not a sparse-runtime quantization file (format {meta.get('format')!r})")
    scheme = QuantScheme.parse(meta.get("scheme", ""))
    record: dict[str, Any] = {}
    man_path = d / "sparsity_manifest.json"
    if man_path.is_file():
        from ..manifest import read_manifest

        record = dict(read_manifest(d).extra.get("quantization") or {})
        if record and record.get("scheme") != scheme.name:
            raise ManifestError(f"{path} says scheme {scheme.name} but the manifest says {record.get('scheme')}: "
                                "the checkpoint is inconsistent; quantize the unquantized checkpoint again")
    names = tuple(sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith(".scales")}))
    return QuantizationInfo(path, scheme, record, dict(json.loads(meta.get("aliases", "{}"))), names)
