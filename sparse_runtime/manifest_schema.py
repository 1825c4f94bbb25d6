"""Field types of a sparsity manifest, checked before any field is used.

Why a separate check: ``Manifest.from_json`` builds dataclasses from whatever the JSON holds, so a
manifest edited by hand (``"nnz": "4096"``, ``"history": 5``, ``"layers": []``) failed later, deep
in verification or in a ``dict()`` call, with a traceback, or was not noticed at all (a string
``measured``). One pass over the structure turns each into one line naming the field.
"""
from __future__ import annotations

from typing import Any

from .errors import ManifestError

_NUM = (int, float)
# field -> (accepted types, may be null, description)
_TOP = {
    "format": ((str,), False, "a string"),
    "version": ((int,), False, "an integer"),
    "layers": ((dict,), False, "an object of layer records"),
    "base_model": ((str,), False, "a string"),
    "dense_source": ((str,), True, "a string or null"),
    "history": ((list,), False, "a list"),
    "extra": ((dict,), False, "an object"),
    "versions": ((dict,), False, "an object"),
    "created": ((str,), False, "a string"),
}
_LAYER = {
    "structure": ((str,), False, "a string ('unstructured' or 'N:M')"),
    "target": (_NUM, True, "a number or null"),
    "measured": (_NUM, False, "a number"),
    "nnz": ((int,), False, "an integer"),
    "shape": ((list,), False, "a list of integers"),
    "mask_sha256": ((str,), False, "a hex string"),
}


def _ok(value: Any, types: tuple, nullable: bool) -> bool:
    if value is None:
        return nullable
    if isinstance(value, bool):  # JSON true/false is not a number here
        return bool in types
    return isinstance(value, types)


def check_manifest_types(data: Any, where: str = "manifest", max_version: int = 1) -> None:
    """Raise :class:`ManifestError` (one line: which field, what it should be, the fix) on the first
    field of the wrong type, a layer record with missing or unknown fields, or a non-object. A
    manifest newer than ``max_version`` is left to the caller's "upgrade" message."""
    fix = ("the checkpoint is corrupt: restore it, or rebuild its manifest with "
           "`sparse-runtime inspect DIR --write-manifest`")
    if not isinstance(data, dict):
        raise ManifestError(f"{where} is not a JSON object; {fix}")
    if "version" in data and not _ok(data["version"], (int,), False):
        raise ManifestError(f"{where}: field 'version' must be an integer, got {data['version']!r:.40}; {fix}")
    if data.get("version", 0) > max_version:
        return
    for key, (types, nullable, what) in _TOP.items():
        if key in data and not _ok(data[key], types, nullable):
            raise ManifestError(f"{where}: field '{key}' must be {what}, got {data[key]!r:.40}; {fix}")
    for name, rec in (data.get("layers") or {}).items():
        if not isinstance(rec, dict):
            raise ManifestError(f"{where}: layer record '{name}' must be an object, got {rec!r:.40}; {fix}")
        missing = sorted(set(_LAYER) - set(rec))
        unknown = sorted(set(rec) - set(_LAYER))
        if missing or unknown:
            raise ManifestError(f"{where}: layer record '{name}' " + (f"lacks {', '.join(missing)}" if missing else
                                f"has unknown fields {', '.join(unknown)}") + f"; {fix}")
        for key, (types, nullable, what) in _LAYER.items():
            if not _ok(rec[key], types, nullable):
                raise ManifestError(f"{where}: field 'layers.{name}.{key}' must be {what}, got {rec[key]!r:.40}; {fix}")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in rec["shape"]):
            raise ManifestError(f"{where}: field 'layers.{name}.shape' must be a list of integers, got "
                                f"{rec['shape']!r:.40}; {fix}")
