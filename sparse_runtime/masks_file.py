"""The checkpoint's masks file: ``sparsity_masks.st``, every block linear's keep-mask at 1 bit.

Why: ``inspect`` of a checkpoint checks its sparsity manifest against the weights, and reading the
weights is reading the whole model (27 GB for a 7B model in fp32: ~30 s at this machine's disk
speed, whatever the scan costs). The keep-masks alone are 1/32 of that, and they are all the
manifest describes (nonzeros, mask digest, N:M). So every checkpoint writer also writes the masks,
and records, for every weight file, what says cheaply whether it has changed since: its name,
size, modification time (ns) and the SHA-256 of its safetensors header. ``inspect`` reads the
masks instead of the weights when every fingerprint still matches, and scans the weights
otherwise, saying why (docs/scale.md#the-masks-file).

Layout: a plain safetensors file (``safetensors.safe_open`` reads it), named ``.st`` so that no
loader globbing ``*.safetensors`` for weights picks it up:

- one ``U8`` tensor ``<layer>.mask`` per block linear: the keep-mask (``weight != 0``) flattened
  row-major and packed 8 to a byte with the first weight in the high bit, zero-padded at the end
  (``numpy.packbits`` of the flat mask: exactly the bytes :func:`sparse_runtime.sparsity.mask_digest`
  hashes after the shape). Its shape is ``[rows, cols / 8]`` when ``cols`` is a multiple of 8 (the
  flat bytes are then whole rows), else ``[ceil(rows * cols / 8)]``;
- metadata: ``format``/``version``, ``shapes`` (``{layer: [rows, cols]}``) and ``weight_files``
  (the fingerprints, JSON).

What the fingerprint cannot see: a weight file rewritten with the same size and header whose
modification time was set back (``touch -d``) or lies within the file system's timestamp
granularity of the original write. The writer waits that granularity out before the checkpoint is
published (:func:`wait_past`), so only a deliberate reset is missed; ``inspect --verify`` reads the
weights whatever the fingerprints say.

Memory: :class:`MasksWriter` appends each mask's packed bytes to a hidden raw file as it comes (one
mask in memory at a time, whichever writer: the streamed prune at 7B produces 0.81 GB of masks),
and ``close`` writes the safetensors header, now that the weight files exist to be fingerprinted,
followed by the raw bytes copied in chunks; the finished file replaces the target by a rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

__all__ = ["MASKS_NAME", "MasksFile", "MasksFileError", "MasksWriter", "write_masks_of_model"]

# Not ``*.safetensors``: loaders that take every ``*.safetensors`` file of a directory without an
# index for weights (our CheckpointReader, vLLM, scripts) must never mistake the masks for weights.
MASKS_NAME = "sparsity_masks.st"
MASKS_FORMAT = "sparse-runtime/sparsity-masks"
MASKS_VERSION = "1"
_COPY_CHUNK = 16 << 20


class MasksFileError(ValueError):
    """A masks file that cannot be used (absent, corrupt, foreign, not this model's): ``inspect``
    falls back to the weights and prints the message as the reason."""


def packed_shape(shape: tuple[int, int]) -> tuple[int, ...]:
    """The stored shape of a ``rows x cols`` weight's packed mask (see the module docstring)."""
    rows, cols = int(shape[0]), int(shape[1])
    return (rows, cols // 8) if cols % 8 == 0 else ((rows * cols + 7) // 8,)


def packed_nbytes(shape: tuple[int, int]) -> int:
    return (int(shape[0]) * int(shape[1]) + 7) // 8


def pack_keep(weight) -> np.ndarray:
    """The flat packed keep-mask (``weight != 0``, -0.0 a zero) of a torch tensor or NumPy array."""
    try:
        import torch

        if isinstance(weight, torch.Tensor):
            weight = (weight.detach() != 0).to("cpu").numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    keep = np.asarray(weight)
    if keep.dtype != np.bool_:
        keep = keep != 0
    return np.packbits(keep.reshape(-1))


# --- fingerprints ---------------------------------------------------------------------------------

def weight_files(directory: os.PathLike, reader=None) -> list[str]:
    """The files a reader takes the weights from: the safetensors files (those its index names,
    else every ``*.safetensors``) and the index itself. ``reader``: the
    directory's :class:`~sparse_runtime.models.streaming.CheckpointReader`, if one is open."""
    from .models.streaming import INDEX_NAMES, CheckpointReader

    d = Path(directory)
    files = set((reader or CheckpointReader(d)).file_of.values())
    files |= {n for n in INDEX_NAMES if (d / n).is_file()}
    return sorted(files)


def _head_sha256(path: Path) -> str:
    """SHA-256 of a safetensors file's 8-byte length and JSON header (an index: of the whole file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".json":
            h.update(f.read())
        else:
            raw = f.read(8)
            h.update(raw)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else 0
            h.update(f.read(min(n, 100 << 20)))
    return h.hexdigest()


def fingerprint(directory: os.PathLike, files: Optional[list[str]] = None) -> list[dict]:
    """``[{file, size, mtime_ns, header_sha256}]`` of the weight files (sorted by name)."""
    d = Path(directory)
    out = []
    for name in (files if files is not None else weight_files(d)):
        st = os.stat(d / name)
        out.append({"file": name, "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns),
                    "header_sha256": _head_sha256(d / name)})
    return out


def wait_past(mtimes_ns: list[int], cap_s: float = 3.0) -> None:
    """Return once a write to any of these files would get a later modification time.

    A file system stamps writes from a coarse clock (a few ms on Linux; 1-2 s on some file systems:
    recognised by times in whole milliseconds), so a file rewritten right after its fingerprint was
    taken could keep its time. Waiting out that granularity here (before the checkpoint is
    published) closes the gap. A time in the future (clock skew) is waited on for ``cap_s`` at most."""
    if not mtimes_ns:
        return
    coarse = all(t % 1_000_000 == 0 for t in mtimes_ns)
    until = max(mtimes_ns) + (2_000_000_000 if coarse else 20_000_000)
    until = min(until, time.time_ns() + int(cap_s * 1e9))
    while (left := until - time.time_ns()) >= 0:
        time.sleep(left / 1e9 + 0.001)


def stale_reason(recorded: list[dict], current: list[dict]) -> Optional[str]:
    """Why the weight files differ from the ones the masks were written with, or None."""
    if [r.get("file") for r in recorded] != [c["file"] for c in current]:
        return "the weight files are not those the masks file was written with"
    for r, c in zip(recorded, current):
        changed = [k for k in ("size", "header_sha256", "mtime_ns") if r.get(k) != c[k]]
        if changed:
            what = {"size": "size", "header_sha256": "header", "mtime_ns": "modification time"}
            return f"{c['file']} changed since the masks file was written ({', '.join(what[k] for k in changed)})"
    return None


# --- writing --------------------------------------------------------------------------------------

class MasksWriter:
    """Write ``directory/sparsity_masks.st`` one mask at a time (see the module docstring).

    ``add(layer, weight)`` packs one weight's mask and appends it; ``begin``/``write``/``end`` take
    a mask already packed, in pieces (``inspect --write-manifest`` packs while it scans). ``close()``
    fingerprints the weight files, which must be complete by then, and writes the file; ``abort()``
    removes what was written. Nothing appears under the final name until ``close`` succeeds."""

    def __init__(self, directory: os.PathLike) -> None:
        self.dir = Path(directory)
        self.raw = self.dir / f".sparsity_masks.raw-{os.getpid()}"
        self._f = open(self.raw, "wb")
        self.entries: list[tuple[str, tuple[int, int], int, int]] = []  # layer, shape, start, end
        self._open: Optional[tuple[str, tuple[int, int], int]] = None
        self._pos = 0

    def begin(self, layer: str, shape: tuple[int, int]) -> None:
        if self._open is not None or any(e[0] == layer for e in self.entries):
            raise ValueError(f"mask of {layer} written twice or interleaved")
        self._open = (layer, (int(shape[0]), int(shape[1])), self._pos)

    def write(self, packed: np.ndarray) -> None:
        data = np.ascontiguousarray(packed, dtype=np.uint8)
        self._f.write(memoryview(data).cast("B"))
        self._pos += data.nbytes

    def end(self) -> None:
        assert self._open is not None
        layer, shape, start = self._open
        if self._pos - start != packed_nbytes(shape):
            raise ValueError(f"mask of {layer}: {self._pos - start} bytes, {packed_nbytes(shape)} expected")
        self.entries.append((layer, shape, start, self._pos))
        self._open = None

    def add(self, layer: str, weight) -> None:
        """Append the mask of ``weight`` (a 2-D torch tensor or array) as ``layer``'s."""
        self.begin(layer, tuple(weight.shape))
        self.write(pack_keep(weight))
        self.end()

    def close(self) -> Path:
        """Fingerprint the weight files, write the masks file, wait out the timestamp granularity."""
        self._f.close()
        prints = fingerprint(self.dir)
        meta = {"format": MASKS_FORMAT, "version": MASKS_VERSION,
                "shapes": json.dumps({n: list(s) for n, s, _, _ in self.entries}, separators=(",", ":")),
                "weight_files": json.dumps(prints, separators=(",", ":"))}
        header: dict = {"__metadata__": meta}
        for n, s, a, b in self.entries:
            header[f"{n}.mask"] = {"dtype": "U8", "shape": list(packed_shape(s)), "data_offsets": [a, b]}
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # data aligned to 8 bytes, as safetensors writes it
        tmp = self.dir / f".sparsity_masks.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as out, open(self.raw, "rb") as src:
                out.write(len(head).to_bytes(8, "little"))
                out.write(head)
                while chunk := src.read(_COPY_CHUNK):
                    out.write(chunk)
            os.replace(tmp, self.dir / MASKS_NAME)
        finally:
            for p in (tmp, self.raw):
                if p.exists():
                    p.unlink()
        wait_past([p["mtime_ns"] for p in prints])
        return self.dir / MASKS_NAME

    def abort(self) -> None:
        """Remove what was written (also after a failed write: a full disk fails the close too)."""
        try:
            if not self._f.closed:
                self._f.close()
        except OSError:
            pass
        finally:
            if self.raw.exists():
                self.raw.unlink()


def write_masks_of_model(directory: os.PathLike, model, family=None) -> Optional[Path]:
    """The masks file of an in-memory model whose weights were just saved to ``directory``
    (one mask packed at a time). None, and no file, when a weight is not in memory (offloaded to
    ``meta`` by a device map): ``inspect`` then scans the weights, as for a checkpoint without one."""
    from .models.family import family_of

    family = family or family_of(model)
    linears = list(family.iter_linears(model))
    if any(lin.weight.device.type == "meta" for _, lin in linears):
        return None
    w = MasksWriter(directory)
    try:
        for name, lin in linears:
            w.add(name, lin.weight)
        return w.close()
    except BaseException:
        w.abort()
        raise


# --- reading --------------------------------------------------------------------------------------

@dataclass
class MasksFile:
    """An opened masks file: where each layer's packed bytes are, and the recorded fingerprints."""

    path: Path
    offsets: dict[str, tuple[int, int]]  # layer -> (absolute start, nbytes)
    shapes: dict[str, tuple[int, int]]
    weight_files: list[dict]

    @classmethod
    def open(cls, directory: os.PathLike, layers: dict[str, tuple[int, int]]) -> "MasksFile":
        """Read and check the header against ``layers`` (``{layer: dense shape}``, the model's);
        :class:`MasksFileError` says what is wrong."""
        path = Path(directory) / MASKS_NAME
        if not path.is_file():
            raise MasksFileError("no masks file")
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= min(size - 8, 64 << 20):
                    raise ValueError("header length out of range")
                head = json.loads(f.read(n))
            meta = head.pop("__metadata__")
            if meta.get("format") != MASKS_FORMAT or meta.get("version") != MASKS_VERSION:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
            shapes = {k: (int(v[0]), int(v[1])) for k, v in json.loads(meta["shapes"]).items()}
            prints = json.loads(meta["weight_files"])
            if not isinstance(prints, list) or not all(isinstance(p, dict) for p in prints):
                raise ValueError("weight_files is not a list of records")
            offsets = {}
            for layer, shape in layers.items():
                e = head.get(f"{layer}.mask")
                if e is None or shapes.get(layer) != tuple(shape):
                    raise ValueError(f"no mask of the right shape for {layer}")
                a, b = (int(x) for x in e["data_offsets"])
                if e["dtype"] != "U8" or tuple(e["shape"]) != packed_shape(shape) or b - a != packed_nbytes(shape) \
                        or 8 + n + b > size:
                    raise ValueError(f"the mask of {layer} does not fit the file (truncated?)")
                offsets[layer] = (8 + n + a, b - a)
            if len(head) != len(layers):
                raise ValueError("it holds masks of layers the model does not have")
        except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
            raise MasksFileError(f"the masks file is unusable ({e})") from e
        return cls(path, offsets, shapes, prints)

    def chunks(self, layer: str, chunk_bytes: int = 4 << 20) -> Iterator[np.ndarray]:
        """The packed bytes of ``layer``'s mask, a chunk at a time (``pread`` into two reused
        buffers, like the weight scan); its pages leave the page cache afterwards."""
        from .inspect import read_row_chunks

        start, nbytes = self.offsets[layer]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            yield from read_row_chunks(fd, start, nbytes, 1, max(1, chunk_bytes))
        finally:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_DONTNEED)
            os.close(fd)
