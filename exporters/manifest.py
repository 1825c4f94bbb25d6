"""The manifest every export writes beside its files: ``export_manifest.json``.

It says what the directory holds (format, files and their sizes, the per-format contents), how it
was made (options, package versions), where it came from (the source spec and the SHA-256 of the
source checkpoint's sparsity manifest, plus a digest over the source's layer masks) and how it
verified on load. Tools decide from the ``format`` field how to read the directory; nothing in it is
ever turned into code.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import json
import os
from pathlib import Path
from typing import Any

from sparse_runtime.errors import ManifestError

EXPORT_MANIFEST_NAME = "export_manifest.json"
EXPORT_MANIFEST_FORMAT = "sparse-runtime/export-manifest"
EXPORT_MANIFEST_VERSION = 1

_PACKAGES = ("sparse-runtime", "torch", "transformers", "safetensors", "numpy", "onnx", "onnxruntime",
             "optimum", "optimum-onnx", "onnxscript")


def export_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != EXPORT_MANIFEST_NAME}


def write_export_manifest(root: Path, payload: dict[str, Any]) -> dict[str, Any]:
    files = file_sizes(root)
    data = {
        "format": EXPORT_MANIFEST_FORMAT,
        "version": EXPORT_MANIFEST_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **payload,
        "files": files,
        "total_bytes": sum(files.values()),
        "versions": {**export_versions(), **payload.get("versions", {})},
    }
    tmp = root / f".{EXPORT_MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, root / EXPORT_MANIFEST_NAME)
    return data


def read_export_manifest(path: os.PathLike) -> dict[str, Any]:
    p = Path(path)
    f = p / EXPORT_MANIFEST_NAME if p.is_dir() else p
    if not f.is_file():
        raise ManifestError(f"no {EXPORT_MANIFEST_NAME} in {p}; this is not a sparse-runtime export "
                            "(make one with `sparse-runtime export`)")
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{f} is not valid JSON ({e}); the export is corrupt") from e
    if data.get("format") != EXPORT_MANIFEST_FORMAT:
        raise ManifestError(f"{f} is not a sparse-runtime export manifest")
    if int(data.get("version", 0)) > EXPORT_MANIFEST_VERSION:
        raise ManifestError(f"{f} has export manifest version {data.get('version')}; upgrade sparse-runtime")
    return data
