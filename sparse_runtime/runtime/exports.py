"""Find or make the export an engine needs, so engines accept a checkpoint directly.

``ensure_export(source, "onnx")`` returns ``source`` itself when it already is an export of that
format, otherwise exports it once (with the exporters package, verified) into
``$SPARSE_RUNTIME_CACHE/exports/<key>/<format>`` and reuses it afterwards. The key digests the
source's path, its config and weight files (size + mtime) and its sparsity manifest, so a changed
checkpoint gets a fresh export.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models.loading import cache_dir

EXPORT_MANIFEST = "export_manifest.json"


def export_format(path: Path) -> str | None:
    f = Path(path) / EXPORT_MANIFEST
    if f.is_file():
        try:
            return json.loads(f.read_text()).get("export_format")
        except (OSError, json.JSONDecodeError):
            return None
    return None


def export_quantization(path: Path) -> dict[str, Any]:
    """The export manifest's quantization record (scheme, method, lm_head, bytes per weight, ...) of a
    quantized export; empty when there is none."""
    try:
        man = json.loads((Path(path) / EXPORT_MANIFEST).read_text())
        return dict(man.get("contents", {}).get("quantization", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def source_key(source: str) -> str:
    h = hashlib.sha256()
    p = Path(source)
    if p.exists():
        p = p.resolve()
        h.update(str(p).encode())
        for f in sorted(p.glob("*")):
            if f.suffix in (".json", ".safetensors"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    else:
        h.update(source.encode())  # a named spec (tiny-*, smollm2-135m): deterministic
    return h.hexdigest()[:16]


def ensure_export(source: str, fmt: str, **options: Any) -> Path:
    """An export of ``source`` in format ``fmt`` (made once and cached)."""
    p = Path(source)
    if p.is_dir() and export_format(p) == fmt:
        return p
    if p.is_dir() and export_format(p) is not None:
        raise ConfigError(f"{p} is a {export_format(p)!r} export; this engine needs a {fmt!r} export or the "
                          "checkpoint it came from")
    try:
        from exporters import export
    except ImportError as e:  # pragma: no cover - depends on the checkout
        raise ConfigError("the exporters package is needed to export checkpoints for this engine") from e
    opt_key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    out = cache_dir() / "exports" / f"{source_key(source)}-{opt_key}" / fmt
    if out.is_dir() and export_format(out) == fmt:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    export(source, fmt, out, overwrite=True, **options)
    return out
