"""The sparsity manifest and the checkpoint writer every stage shares.

A checkpoint is a Hugging Face directory (safetensors) plus ``sparsity_manifest.json``:

- per prunable layer: structure (``unstructured`` or ``N:M``, N zeros of M), target and measured
  sparsity, nonzero count, shape, and a SHA-256 digest of the keep-mask;
- the model-level totals, the recipe and history of stages that produced it, where the dense weights
  came from (DSnoT and re-pruning need them), and the package versions.

Writes go to a temporary directory beside the target and are renamed into place, so a crash or a
full disk never leaves a half-written checkpoint that looks complete. An existing target is refused
unless ``overwrite=True``. On load, :func:`verify_manifest` recomputes every digest: a manifest that
disagrees with the weights (tampering, a foreign checkpoint, a bug) is an error.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from .errors import CheckpointExistsError, ManifestError, SparseRuntimeError
from .faults import fault_point
from .manifest_schema import check_manifest_types
from .sparsity import NMPattern, mask_digest, nm_compliant, parse_structure

MANIFEST_NAME = "sparsity_manifest.json"
MANIFEST_FORMAT = "sparse-runtime/sparsity-manifest"
MANIFEST_VERSION = 1


@dataclass
class LayerRecord:
    structure: str  # "unstructured" | "N:M"
    target: Optional[float]
    measured: float
    nnz: int
    shape: list[int]
    mask_sha256: str


@dataclass
class Manifest:
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    base_model: str = ""
    dense_source: Optional[str] = None
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""

    @property
    def total_measured(self) -> float:
        n = sum(_numel(r.shape) for r in self.layers.values())
        z = sum(_numel(r.shape) - r.nnz for r in self.layers.values())
        return z / n if n else 0.0

    @property
    def total_target(self) -> Optional[float]:
        if not self.layers or any(r.target is None for r in self.layers.values()):
            return None
        n = sum(_numel(r.shape) for r in self.layers.values())
        return sum(r.target * _numel(r.shape) for r in self.layers.values()) / n

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "created": self.created,
            "base_model": self.base_model,
            "dense_source": self.dense_source,
            "total": {"target": self.total_target, "measured": self.total_measured},
            "layers": {k: asdict(v) for k, v in self.layers.items()},
            "history": self.history,
            "extra": self.extra,
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "manifest") -> "Manifest":
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{where} is not a sparse-runtime sparsity manifest (format field missing or foreign)")
        check_manifest_types(data, where, MANIFEST_VERSION)  # wrong field types: one line naming the field (manifest_schema.py)
        if int(data.get("version", 0)) > MANIFEST_VERSION:
            raise ManifestError(f"{where} has manifest version {data.get('version')}; this sparse-runtime "
                                f"reads up to {MANIFEST_VERSION}: upgrade sparse-runtime")
        try:
            layers = {k: LayerRecord(**v) for k, v in data["layers"].items()}
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{where} is corrupt: {e}") from e
        return cls(layers=layers, base_model=data.get("base_model", ""), dense_source=data.get("dense_source"),
                   history=list(data.get("history", [])), extra=dict(data.get("extra", {})),
                   versions=dict(data.get("versions", {})), created=data.get("created", ""))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("sparse-runtime", "torch", "transformers", "onnx", "onnxruntime", "optimum"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def layer_record(weight: torch.Tensor, structure: Optional[str] = None, target: Optional[float] = None) -> LayerRecord:
    keep = weight.detach() != 0
    nnz = int(keep.sum().item())
    return LayerRecord(
        structure=structure or "unstructured",
        target=None if target is None else float(target),
        measured=1.0 - nnz / max(1, keep.numel()),
        nnz=nnz,
        shape=list(weight.shape),
        mask_sha256=mask_digest(keep),
    )


# ``extra`` records that describe the VALUES of the weights (the quantization grid and its side file,
# docs/quantization.md#format). A new manifest is built because the weights were written again
# (pruned, repaired, merged, quantized): such a record is dropped unless the step restates it, else a
# repaired copy of a quantized checkpoint would claim a grid its values no longer lie on (and
# ``quantize`` would refuse it as "already quantized").
VALUE_RECORDS = ("quantization",)


def carried_extra(previous: Optional["Manifest"]) -> dict[str, Any]:
    """``previous.extra`` less the records of the previous weights' values (:data:`VALUE_RECORDS`)."""
    if previous is None:
        return {}
    return {k: v for k, v in previous.extra.items() if k not in VALUE_RECORDS}


def build_manifest(model, family=None, *, targets: Optional[dict[str, float]] = None,
                   structures: Optional[dict[str, str]] = None, base_model: str = "",
                   dense_source: Optional[str] = None, previous: Optional[Manifest] = None,
                   step: Optional[dict[str, Any]] = None, extra: Optional[dict[str, Any]] = None,
                   records: Optional[dict[str, LayerRecord]] = None) -> Manifest:
    """Measure ``model``'s block linears and describe them. ``previous`` carries history/targets
    forward so a chain of stages keeps its record; ``step`` is appended to the history.
    ``records`` (``{layer: LayerRecord}``) are measurements already taken, e.g. of a streamed model
    whose blocks were measured as they were written (its skeleton holds no weights)."""
    from .models.family import family_of

    family = family or family_of(model)
    targets = dict(targets or {})
    structures = dict(structures or {})
    layers = {}
    for name, lin in family.iter_linears(model):
        prev = previous.layers.get(name) if previous else None
        target = targets.get(name, prev.target if prev else None)
        structure = structures.get(name, prev.structure if prev else "unstructured")
        if records is not None:
            rec = records[name]
            layers[name] = LayerRecord(structure=structure or "unstructured",
                                       target=None if target is None else float(target), measured=rec.measured,
                                       nnz=rec.nnz, shape=list(rec.shape), mask_sha256=rec.mask_sha256)
        else:
            layers[name] = layer_record(lin.weight, structure, target)
    m = Manifest(
        layers=layers,
        base_model=base_model or (previous.base_model if previous else ""),
        dense_source=dense_source if dense_source is not None else (previous.dense_source if previous else None),
        history=list(previous.history) if previous else [],
        extra=carried_extra(previous),
        versions=package_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    if step:
        m.history.append(step)
    if extra:
        m.extra.update(extra)
    return m


def verify_manifest(model, manifest: Manifest, family=None, *, rtol_sparsity: float = 0.0) -> None:
    """Recompute every layer's mask digest and structure; raise :class:`ManifestError` on disagreement."""
    from .models.family import family_of

    family = family or family_of(model)
    actual = dict(family.iter_linears(model))
    check_manifest_layers(actual, manifest)
    bad = [msg for name, rec in manifest.layers.items()
           if (msg := check_layer(name, actual[name].weight, rec)) is not None]
    raise_if_bad(bad)


def check_manifest_layers(actual: Iterable[str], manifest: Manifest) -> None:
    """The manifest names exactly the model's prunable layers (no more, no fewer)."""
    actual = list(actual)
    missing = sorted(set(manifest.layers) - set(actual))
    if missing:
        raise ManifestError(
            f"the manifest names layers the model does not have ({', '.join(missing[:3])}...): "
            "it belongs to another model; rebuild it with `sparse-runtime inspect DIR --write-manifest`"
        )
    # every prunable layer must be accounted for: a record deleted together with a tampered layer
    # would otherwise leave that layer unchecked and the checkpoint "verified"
    unrecorded = [n for n in actual if n not in manifest.layers]
    if unrecorded:
        raise ManifestError(
            f"the sparsity manifest accounts for {len(manifest.layers)} of the model's {len(actual)} prunable "
            f"layers; it has no record of {', '.join(unrecorded[:3])}{'...' if len(unrecorded) > 3 else ''} "
            "(tampered or corrupt checkpoint): rebuild it from trusted weights with "
            "`sparse-runtime inspect DIR --write-manifest`")


def check_layer(name: str, weight: torch.Tensor, rec: LayerRecord) -> Optional[str]:
    """What is wrong with one layer against its record (shape, nonzeros, mask digest, N:M), or None."""
    w = weight.detach()
    if list(w.shape) != list(rec.shape):
        return f"{name}: shape {list(w.shape)} != manifest {rec.shape}"
    keep = w != 0
    return check_layer_facts(name, w.shape, int(keep.sum().item()), mask_digest(keep),
                             lambda p: nm_compliant(w, p), rec)


def check_layer_facts(name: str, shape, nnz: int, digest: str, satisfies: Callable[[NMPattern], bool],
                      rec: LayerRecord) -> Optional[str]:
    """:func:`check_layer` on measured facts (shape, nonzero count, mask digest, and whether the
    weight satisfies an N:M pattern), for readers that never hold the weight (``inspect``)."""
    if list(shape) != list(rec.shape):
        return f"{name}: shape {list(shape)} != manifest {rec.shape}"
    if nnz != rec.nnz or digest != rec.mask_sha256:
        return f"{name}: {nnz} nonzeros (manifest says {rec.nnz}) or a different mask"
    pattern = parse_structure(rec.structure)
    if isinstance(pattern, NMPattern) and not satisfies(pattern):
        return f"{name}: manifest says {rec.structure} but the weights break that pattern"
    return None


def raise_if_bad(bad: list[str]) -> None:
    if bad:
        raise ManifestError("the sparsity manifest disagrees with the weights (tampered or corrupt checkpoint): "
                            + "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""))


def read_manifest(path: os.PathLike) -> Manifest:
    p = Path(path)
    f = p / MANIFEST_NAME if p.is_dir() else p
    if not f.is_file():
        raise ManifestError(f"no sparsity manifest at {f}; this is not a sparse-runtime checkpoint")
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt") from e
    return Manifest.from_json(data, str(f))


TMP_MARK = ".tmp-"  # ``.<name>.tmp-<pid>-<random>``: a write in progress (or an interrupted one)
OLD_MARK = ".old-"  # ``.<name>.old-<pid>``: the previous target during the swap


def current_umask() -> int:
    """The process umask, read without changing it where the kernel tells (Linux >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(root: os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir``/``open`` would have had.

    ``tempfile.mkdtemp`` creates 0700 directories (and some writers 0600 files) whatever the umask;
    renamed into place they would keep those modes, and a serving container running as another
    user could not read the checkpoint. Executable files keep their execute bits (scripts).
    """
    mask = current_umask()
    root = Path(root)
    if root.is_symlink():
        return
    if root.is_file():
        mode = 0o777 if os.stat(root).st_mode & 0o111 else 0o666
        os.chmod(root, mode & ~mask)
        return
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                mode = 0o777 if os.stat(p).st_mode & 0o111 else 0o666
                os.chmod(p, mode & ~mask)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return True
    return True


def clean_stale_temporaries(target: os.PathLike) -> list[Path]:
    """Remove hidden temporary directories that an interrupted write of ``target`` left beside it.

    Only ours: names ``.<target name>.tmp-<pid>-...`` or ``.<target name>.old-<pid>`` (see
    :class:`atomic_directory`) whose process is no longer alive; another process's write in
    progress is left alone. Returns what was removed.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    removed = []
    for mark in (TMP_MARK, OLD_MARK):
        prefix = f".{target.name}{mark}"
        try:
            entries = list(parent.iterdir())
        except OSError:
            return removed
        for p in entries:
            if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
                continue
            pid_text = p.name[len(prefix):].split("-", 1)[0]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)):
                continue
            if mark == OLD_MARK and not target.exists():
                # killed between moving the previous output aside and renaming the new one in:
                # the previous output is the only complete one, so it goes back, not away
                os.replace(p, target)
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def make_temporary_beside(target: os.PathLike) -> Path:
    """A fresh hidden directory beside ``target`` named so :func:`clean_stale_temporaries` knows it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}{os.getpid()}-", dir=target.parent))


def overlaps_input(out: os.PathLike, spec) -> bool:
    """Whether the output directory ``out`` is the input ``spec``, lies inside it, or holds it
    (symbolic links resolved); False when ``spec`` is no existing path (a model name such as
    ``tiny-llama``). Writing into such an ``out``, or replacing it, would destroy the input."""
    if spec is None or not Path(str(spec)).expanduser().exists():
        return False
    src = Path(os.path.realpath(Path(str(spec)).expanduser()))
    real = Path(os.path.realpath(Path(out).expanduser()))
    return real == src or src in real.parents or real in src.parents


def write_file_atomic(path: os.PathLike, data) -> None:
    """Write ``data`` (str or bytes) to ``path`` so that the file is complete or absent: written
    beside it under a hidden name, then renamed; a failed write (a full disk) leaves nothing."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, (bytes, bytearray)):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_directory(src: os.PathLike, target: os.PathLike) -> None:
    """Move the complete directory ``src`` to ``target``, replacing an existing ``target``.

    The modes are set to the umask's first; an existing ``target`` is moved aside (``.old-<pid>``)
    and removed only after ``src`` is in place, so at every instant either the old or the new
    directory is at ``target``.
    """
    src, target = Path(src), Path(target)
    apply_umask(src)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}{OLD_MARK}{os.getpid()}")
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    fault_point("before-rename")  # test hook (sparse_runtime/faults.py); nothing when unset
    try:
        os.replace(src, target)
        fault_point("after-rename")
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)  # put the previous one back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class atomic_directory:
    """Context manager yielding a temporary directory that replaces ``target`` on success.

    ``target`` existing is an error unless ``overwrite``; on failure the temporary directory is
    removed and ``target`` is untouched. A full disk becomes a clear error. Everything the caller
    writes (reports, plots) belongs inside the temporary directory: the rename is the last step,
    so a ``target`` that exists is complete. Stale temporaries of interrupted earlier writes are
    cleaned first; the result gets the umask's modes.
    """

    def __init__(self, target: os.PathLike, overwrite: bool = False) -> None:
        self.target = Path(target)
        self.overwrite = overwrite
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        clean_stale_temporaries(self.target)  # may also put back an output a kill left aside
        if self.target.exists() and not self.overwrite:
            raise CheckpointExistsError(f"{self.target} already exists; choose another --out or pass --overwrite")
        self.tmp = make_temporary_beside(self.target)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise SparseRuntimeError(
                    f"the disk holding {self.target.parent} is full; nothing was written. Free space or "
                    "choose another --out") from exc
            return False
        replace_directory(self.tmp, self.target)
        return False


def save_checkpoint(model, tokenizer, out: os.PathLike, manifest: Manifest, *, overwrite: bool = False,
                    extra_files: Optional[dict[str, str]] = None,
                    on_write: Optional[Callable[[Path], None]] = None) -> Path:
    """Write model (safetensors), tokenizer, manifest and masks file (``sparse_runtime/masks_file.py``,
    what lets ``inspect`` skip reading the weights) atomically to ``out``.

    ``on_write(tmp)`` writes the caller's own files (report, plot) into the temporary directory
    before the rename, so a ``kill -9`` can never leave a checkpoint without them."""
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        fault_point("write")
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=1))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if on_write is not None:
            on_write(tmp)
        from .masks_file import write_masks_of_model

        write_masks_of_model(tmp, model)  # last: it fingerprints the weight files written above
    return out
