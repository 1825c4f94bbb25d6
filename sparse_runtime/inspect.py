"""Sparsity inspection: per-layer and total sparsity of the block linears, and N:M compliance.

Two paths with one answer: :func:`inspect_sparsity` measures a model in memory;
:func:`inspect_directory` reads a Hugging Face directory one weight at a time in row chunks (never
the whole model), so a 7B checkpoint is inspected in the memory of one chunk.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from .errors import ModelLoadError, SparseRuntimeError
from .models.streaming import ITEMSIZE, CheckpointReader
from .sparsity import NMPattern, detect_nm, parse_structure


@dataclass
class LayerSparsity:
    name: str
    shape: tuple[int, int]
    sparsity: float
    nm: list[str] = field(default_factory=list)


@dataclass
class SparsityReport:
    layers: list[LayerSparsity]

    @property
    def total(self) -> float:
        n = sum(l.shape[0] * l.shape[1] for l in self.layers)
        z = sum(l.sparsity * l.shape[0] * l.shape[1] for l in self.layers)
        return z / n if n else 0.0

    @property
    def nm_all(self) -> list[str]:
        """N:M patterns every layer satisfies."""
        if not self.layers:
            return []
        common = set(self.layers[0].nm)
        for l in self.layers[1:]:
            common &= set(l.nm)
        return sorted(common)

    def rows(self) -> list[dict]:
        return [{"layer": l.name, "shape": f"{l.shape[0]}x{l.shape[1]}", "sparsity": round(l.sparsity, 4),
                 "N:M": ",".join(l.nm) or "-"} for l in self.layers]


def inspect_sparsity(model, family=None, patterns: tuple[str, ...] = ("2:4", "4:8")) -> SparsityReport:
    from .models.family import family_of

    family = family or family_of(model)
    layers = []
    for name, lin in family.iter_linears(model):
        w = lin.weight.detach()
        layers.append(LayerSparsity(name, tuple(w.shape), float((w == 0).float().mean()), detect_nm(w, patterns)))
    return SparsityReport(layers)


# --- directories: headers and one tensor at a time ------------------------------------------------
#
# Why not load the model: a 7B checkpoint in fp32 is 27 GB, more than many machines' RAM, and
# counting zeros needs none of it at once. A Hugging Face directory is read from config.json (the
# family and the block count), the safetensors headers (names, shapes, dtypes, byte offsets) and
# then each block linear's weight, one tensor at a time, in chunks of whole rows read with ``pread``
# in its stored dtype (why not a memory map: ``keep_chunks``). A bitmask export is read from its
# 1-bit masks instead. Memory is two chunk buffers and one boolean mask (``SCAN_CHUNK_ELEMS``
# values), never a tensor, never the model (docs/scale.md#inspect).

SCAN_CHUNK_ELEMS = 1 << 22


@dataclass
class LayerScan:
    """What one weight's scan measured: nonzeros, the mask digest (``sparsity.mask_digest``'s, when
    asked) and the N:M patterns every row keeps."""

    name: str
    shape: tuple[int, int]
    nnz: int
    digest: Optional[str]
    nm: list[str]

    @property
    def sparsity(self) -> float:
        n = self.shape[0] * self.shape[1]
        return 1.0 - self.nnz / n if n else 0.0


@dataclass
class DirectoryInspection:
    """``inspect_directory``'s answer: the report, the scans (None with ``trust_manifest``), the
    manifest (None for a plain model), and the family."""

    report: SparsityReport
    scans: Optional[dict[str, LayerScan]]
    manifest: Any
    family: Any
    source: str
    from_manifest: bool = False
    export_masks_verified: Optional[bool] = None  # a bitmask export whose export manifest's masks were checked
    from_masks: bool = False  # figures read off the masks file, the weight files' fingerprints unchanged
    masks_note: Optional[str] = None  # why the masks file was not used (a manifest was checked on the weights)
    masks_file_matches: Optional[bool] = None  # full_scan: the masks file agrees with the weights (None: none)
    bitmask_layers: int = 0  # layers read from compressed bitmasks (1 bit per weight), not dense weights


def _popcount_table() -> np.ndarray:
    return np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


_POP8 = _popcount_table()


def _group_ok(packed: np.ndarray, p: NMPattern) -> bool:
    """For M dividing 8: whether every M-bit group of the packed bytes holds at most M - N ones.

    SWAR on 64-bit words (8 bytes at a time, a handful of vector operations per word instead of a
    table lookup per byte): bit counts of 2-bit, then 4-bit, then 8-bit fields, up to M; adding
    ``2**(M-1) - kept - 1`` to every M-bit count sets the field's top bit exactly when the count
    exceeds ``kept``, and no field overflows into the next (count + constant < 2**M). Groups never
    straddle bytes, so the byte order of the words does not matter; the tail is zero-padded (zero
    bits break no pattern)."""
    if packed.size % 8:
        packed = np.concatenate([packed, np.zeros(8 - packed.size % 8, dtype=np.uint8)])
    x = packed.view(np.uint64)
    c = np.right_shift(x, np.uint64(1))  # in place from here: two word arrays, no more
    c &= np.uint64(0x5555555555555555)
    np.subtract(x, c, out=c)  # 2-bit counts
    t = np.empty_like(c)
    for shift, keep in ((2, 0x3333333333333333), (4, 0x0F0F0F0F0F0F0F0F))[: {2: 0, 4: 1, 8: 2}[p.m]]:
        np.right_shift(c, np.uint64(shift), out=t)  # 4-bit, then 8-bit counts
        t &= np.uint64(keep)
        c &= np.uint64(keep)
        c += t
    fields = {2: 0x5555555555555555, 4: 0x1111111111111111, 8: 0x0101010101010101}[p.m]  # 1 per field
    c += np.uint64(fields * ((1 << (p.m - 1)) - p.kept - 1))
    c &= np.uint64(fields << (p.m - 1) & 0xFFFFFFFFFFFFFFFF)
    return not bool(c.any())


def _byte_ok_table(p: NMPattern) -> np.ndarray:
    """For M dividing 8: which packed bytes (8 keep bits, first weight high) keep every M-group of
    their bits within M - N nonzeros (the plain reference :func:`_group_ok` is tested against)."""
    ok = np.ones(256, dtype=bool)
    for b in range(256):
        bits = [(b >> (7 - i)) & 1 for i in range(8)]
        ok[b] = all(sum(bits[j:j + p.m]) <= p.kept for j in range(0, 8, p.m))
    return ok


class _MaskScan:
    """The running state of one weight's scan: nonzeros, the digest and the N:M patterns still
    kept, fed the keep-mask packed 8 to a byte (first weight in the high bit, row-major, the flat
    mask's bytes: what ``numpy.packbits`` and :func:`sparse_runtime.sparsity.mask_digest` make).

    Everything is read off the packed bytes: nonzeros by a popcount, N:M for M dividing 8 by
    :func:`_group_ok` (M a multiple of 8: from byte counts); every M-group falls inside whole bytes
    because rows start at multiples of M (``cols % M == 0``, else the pattern fails at once). Any
    other M is checked on the unpacked bits (:meth:`take_bits`)."""

    def __init__(self, shape: tuple[int, int], patterns: Sequence[str], digest: bool) -> None:
        rows, cols = shape
        self.pats = [NMPattern.parse(p) for p in patterns]
        self.ok = {str(p): cols % p.m == 0 for p in self.pats}
        self.small_m = {str(p) for p in self.pats if 8 % p.m == 0}  # checked by _group_ok
        self.odd = [p for p in self.pats if 8 % p.m and p.m % 8]  # M neither dividing 8 nor a multiple of 8
        self.h = hashlib.sha256(str((int(rows), int(cols))).encode()) if digest else None
        self.nnz = 0
        self.total_bits = int(rows) * int(cols)
        self.bits_seen = 0
        self.bit_carry = np.zeros(0, dtype=bool)

    def take(self, packed: np.ndarray) -> None:
        self.nnz += _count_ones(packed)
        if self.h is not None:
            self.h.update(packed.data if packed.flags.c_contiguous else packed.tobytes())
        for p in self.pats:
            key = str(p)
            if not self.ok[key]:
                continue
            if key in self.small_m:  # a small head first: an unstructured mask fails there, cheaply
                self.ok[key] = _group_ok(packed[:4096], p) and (packed.size <= 4096 or _group_ok(packed[4096:], p))
            elif p.m % 8 == 0:
                self.ok[key] = bool((_popcount(packed).reshape(-1, p.m // 8).sum(-1, dtype=np.int32) <= p.kept).all())

    def take_bits(self, keep: np.ndarray) -> None:
        """The odd-M patterns on a flat boolean mask of whole M-groups (whole rows do)."""
        for p in self.odd:
            if self.ok[str(p)]:
                self.ok[str(p)] = bool((keep.reshape(-1, p.m).sum(-1, dtype=np.int32) <= p.kept).all())

    def take_packed(self, packed: np.ndarray) -> None:
        """A piece of the packed mask cut anywhere between bytes (a masks file's chunk)."""
        self.take(packed)
        if any(self.ok[str(p)] for p in self.odd):
            bits = np.unpackbits(packed).view(bool)[: self.total_bits - self.bits_seen]
            flat = np.concatenate([self.bit_carry, bits]) if self.bit_carry.size else bits
            whole = flat.size - flat.size % math.lcm(*(p.m for p in self.odd))
            self.take_bits(flat[:whole])
            self.bit_carry = flat[whole:].copy()
        self.bits_seen = min(self.total_bits, self.bits_seen + 8 * packed.size)

    def result(self) -> tuple[int, Optional[str], list[str]]:
        return self.nnz, (self.h.hexdigest() if self.h is not None else None), [str(p) for p in self.pats
                                                                                 if self.ok[str(p)]]


def _popcount(packed: np.ndarray) -> np.ndarray:
    """Ones per byte (``bitwise_count``: NumPy 2; else a table)."""
    return np.bitwise_count(packed) if hasattr(np, "bitwise_count") else _POP8[packed]


def _count_ones(packed: np.ndarray) -> int:
    """Ones in the packed bytes, 8 bytes at a time where NumPy can (3x the byte-wise count)."""
    if hasattr(np, "bitwise_count") and packed.size % 8 == 0 and packed.flags.c_contiguous:
        return int(np.bitwise_count(packed.view(np.uint64)).sum(dtype=np.int64))
    return int(_popcount(packed).sum(dtype=np.int64))


def scan_rows(chunks: Iterable[np.ndarray], shape: tuple[int, int], patterns: Sequence[str],
              digest: bool, on_packed: Optional[Callable[[np.ndarray], None]] = None
              ) -> tuple[int, Optional[str], list[str]]:
    """Count nonzeros, digest the keep-mask and check N:M over chunks of whole rows of one weight.

    ``chunks`` yields flat boolean keep-masks (True = nonzero) of consecutive whole rows, row-major.
    Everything is read off the mask packed 8 to a byte (``numpy.packbits``, first weight in the high
    bit, :class:`_MaskScan`), which is why a scan costs little more than reading the weight. The
    digest equals :func:`sparse_runtime.sparsity.mask_digest` of the whole mask (SHA-256 of the shape
    text and the packed mask, zero-padded); bits that do not fill a byte carry over to the next
    chunk. ``on_packed`` receives the packed bytes in order (``inspect --write-manifest`` writes
    them to the masks file)."""
    scan = _MaskScan(shape, patterns, digest)
    carry = np.zeros(0, dtype=bool)

    def take(packed: np.ndarray) -> None:
        scan.take(packed)
        if on_packed is not None:
            on_packed(packed)

    for keep in chunks:
        scan.take_bits(keep)
        flat = np.concatenate([carry, keep]) if carry.size else keep
        cut = flat.size - flat.size % 8
        take(np.packbits(flat[:cut]))
        carry = flat[cut:].copy()
    if carry.size:
        take(np.packbits(carry))
    return scan.result()


def scan_packed(chunks: Iterable[np.ndarray], shape: tuple[int, int], patterns: Sequence[str],
                digest: bool) -> tuple[int, Optional[str], list[str]]:
    """:func:`scan_rows` on a mask already packed (a masks file's bytes, in pieces cut anywhere):
    the same nonzeros, digest and N:M answers, reading 1 bit per weight."""
    scan = _MaskScan(shape, patterns, digest)
    unit = math.lcm(1, *(p.m // 8 for p in scan.pats if p.m % 8 == 0))  # whole byte-groups per piece
    carry = np.zeros(0, dtype=np.uint8)
    for packed in chunks:
        flat = np.concatenate([carry, packed]) if carry.size else packed
        cut = flat.size - flat.size % unit
        scan.take_packed(flat[:cut])
        carry = flat[cut:].copy()
    if carry.size:
        scan.take_packed(carry)
    return scan.result()


_SIGN_FREE = {"F32": (np.float32, None), "F64": (np.float64, None),
              "BF16": (np.uint16, 0x7FFF), "F16": (np.uint16, 0x7FFF)}
_ITEMSIZE = ITEMSIZE


def read_row_chunks(fd: int, offset: int, rows: int, row_bytes: int, step: int) -> Iterator[np.ndarray]:
    """Raw bytes of ``step`` rows at a time of the tensor stored at ``offset`` in the open file
    ``fd``, read with ``pread`` into two buffers reused for the whole tensor (each yielded view is
    valid until the next one). The next chunk is read (the GIL released in ``preadv``) while the
    caller works on this one, so disk and CPU overlap."""
    from concurrent.futures import ThreadPoolExecutor

    starts = list(range(0, rows, step))
    bufs = [np.empty(min(rows, step) * row_bytes, dtype=np.uint8) for _ in range(min(2, len(starts)))]

    def read(i: int) -> int:
        r0 = starts[i]
        nbytes = (min(rows, r0 + step) - r0) * row_bytes
        view = memoryview(bufs[i % 2])[:nbytes]
        got = 0
        while got < nbytes:
            k = os.preadv(fd, [view[got:]], offset + r0 * row_bytes + got)
            if k <= 0:
                raise ModelLoadError("a safetensors file ended before its header's tensors did (truncated); "
                                     "copy the model again")
            got += k
        return nbytes

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, 0) if starts else None
        for i in range(len(starts)):
            nbytes = pending.result()
            pending = pool.submit(read, i + 1) if i + 1 < len(starts) else None
            yield bufs[i % 2][:nbytes]


def keep_chunks(fd: int, offset: int, shape: tuple[int, int], st_dtype: str,
                chunk_elems: int = SCAN_CHUNK_ELEMS) -> Iterator[np.ndarray]:
    """Flat keep-masks (value != 0; -0.0 is zero) of consecutive whole rows of the weight stored at
    ``offset`` in ``fd``.

    Why not a memory map: pages of a mapped file stay charged to the reader's memory cgroup (and
    its resident set) until reclaimed, so a 27 GB scan would show as 27 GB "used"; reading into
    reused buffers and dropping each tensor's pages from the page cache afterwards
    (``posix_fadvise(DONTNEED)``) keeps both at one chunk. Reused buffers also avoid the page faults
    of a fresh allocation per chunk, which cost more than the comparison itself."""
    rows, cols = shape
    if st_dtype not in _SIGN_FREE:
        raise ModelLoadError(f"cannot inspect a weight stored as {st_dtype}; float32, bfloat16 and float16 are read")
    np_dtype, mask = _SIGN_FREE[st_dtype]
    item = _ITEMSIZE[st_dtype]
    step = max(1, chunk_elems // max(1, cols))
    keep = np.empty(min(rows, step) * cols, dtype=bool)
    tmp = np.empty(min(rows, step) * cols, dtype=np.uint16) if mask is not None else None
    for raw in read_row_chunks(fd, offset, rows, cols * item, step):
        n = raw.size // item
        values = raw.view(np_dtype)
        if mask is None:
            np.not_equal(values, 0, out=keep[:n])
        else:
            np.bitwise_and(values, mask, out=tmp[:n])
            np.not_equal(tmp[:n], 0, out=keep[:n])
        yield keep[:n]


def bitmask_keep_chunks(fd: int, offset: int, shape: tuple[int, int],
                        chunk_elems: int = SCAN_CHUNK_ELEMS) -> Iterator[np.ndarray]:
    """Flat keep-masks of whole rows from a bitmask export's ``<layer>.bitmask`` (uint8
    ``R x ceil(C/8)``, little bit order: ``exporters/bitmask.py``): 1 bit per weight is read."""
    rows, cols = shape
    row_bytes = (cols + 7) // 8
    step = max(1, chunk_elems // max(1, cols))
    for raw in read_row_chunks(fd, offset, rows, row_bytes, step):
        bits = np.unpackbits(raw.reshape(-1, row_bytes), axis=-1, count=cols, bitorder="little")
        yield bits.view(bool).reshape(-1)


class _Shards(CheckpointReader):
    """The directory's safetensors files (headers, offsets: :class:`CheckpointReader`) with the
    scan's readers: keep-mask chunks of one tensor at a time, dropped from the page cache after."""

    @property
    def where(self) -> dict[str, str]:
        return self.file_of

    def keep_chunks(self, name: str, chunk_elems: int = SCAN_CHUNK_ELEMS,
                    bitmask_of: Optional[tuple[int, int]] = None) -> Iterator[np.ndarray]:
        """Keep-mask chunks of the weight ``name`` (or, with ``bitmask_of`` = the dense shape, of the
        bitmask tensor ``name``); its pages leave the page cache when the scan ends."""
        fname, off, shape, dtype = self.entry(name)
        fd = os.open(self.path / fname, os.O_RDONLY)
        try:
            if bitmask_of is not None:
                if dtype != "U8" or shape != (bitmask_of[0], (bitmask_of[1] + 7) // 8):
                    raise ModelLoadError(f"cannot load the weights in {self.path}: {name} is {dtype} {list(shape)}, "
                                         f"not the bitmask of a {bitmask_of[0]}x{bitmask_of[1]} weight; the export "
                                         "is corrupt: export again")
                yield from bitmask_keep_chunks(fd, off, bitmask_of, chunk_elems)
            else:
                yield from keep_chunks(fd, off, (shape[0], shape[1]), dtype, chunk_elems)
        finally:
            if hasattr(os, "posix_fadvise"):
                n = 1
                for d in shape:
                    n *= d
                os.posix_fadvise(fd, off, n * _ITEMSIZE.get(dtype, 1), os.POSIX_FADV_DONTNEED)
            os.close(fd)

    def read_small(self, name: str) -> np.ndarray:
        """A small tensor (a bitmask export's ``.shape``) as a flat NumPy array."""
        fname, off, shape, dtype = self.entry(name)
        np_dtype = {"I64": np.int64, "I32": np.int32}.get(dtype)
        if np_dtype is None or len(shape) > 2 or int(np.prod(shape)) > 16:
            raise ModelLoadError(f"cannot load the weights in {self.path}: {name} is not a small integer tensor")
        with open(self.path / fname, "rb") as f:
            f.seek(off)
            return np.frombuffer(f.read(int(np.prod(shape)) * np.dtype(np_dtype).itemsize), dtype=np_dtype)


def _dir_of(spec) -> Optional[Path]:
    """The Hugging Face directory ``spec`` names (the default model included), else None."""
    from .models.loading import DEFAULT_MODEL, ensure_smollm2

    text = str(spec)
    if text.lower() == DEFAULT_MODEL:
        return ensure_smollm2()
    p = Path(text).expanduser()
    return p if p.is_dir() else None


def implied_patterns(structure: Optional[str], candidates: Sequence[str]) -> list[str]:
    """The candidate N:M patterns a recorded structure guarantees (2:4 implies 4:8, not the reverse)."""
    rec = parse_structure(structure)
    if not isinstance(rec, NMPattern):
        return []
    out = []
    for c in candidates:
        p = NMPattern.parse(c)
        if p.m % rec.m == 0 and (p.m // rec.m) * rec.kept <= p.kept:
            out.append(c)
    return out


def inspect_directory(spec, patterns: tuple[str, ...] = ("2:4", "4:8"), *, trust_manifest: bool = False,
                      verify: bool = True, digests: bool = False, chunk_elems: int = SCAN_CHUNK_ELEMS,
                      tensor_read=None, full_scan: bool = False, mask_sink=None) -> DirectoryInspection:
    """Inspect a Hugging Face directory without loading the model (see the section comment).

    With a sparsity manifest, every layer's nonzero count, mask digest and recorded N:M pattern are
    checked against the scanned tensors exactly as :func:`sparse_runtime.manifest.verify_manifest`
    does on load (``verify=False``: read, not checked, for ``--write-manifest``). ``trust_manifest``
    skips the scan and reports the manifest's figures (shapes still checked against the headers).
    ``digests`` computes mask digests even without a manifest. ``tensor_read(name)`` is called once
    per weight read (a test hook that proves one tensor at a time).

    A checkpoint with a manifest and a masks file (``sparse_runtime/masks_file.py``) whose weight
    files are unchanged since it was written is checked from the masks alone (``from_masks``; 1
    bit per weight read); anything else (no masks file, a changed fingerprint, a masks file that is
    corrupt or disagrees with the manifest) scans the weights, ``masks_note`` saying why.
    ``full_scan`` (``--verify``) always scans the weights and then checks the masks file, if any,
    against them: a masks file that disagrees is an error. ``mask_sink`` (a
    :class:`~sparse_runtime.masks_file.MasksWriter`) receives every scanned mask, packed."""
    from transformers import AutoConfig

    from .errors import ManifestError
    from .manifest import MANIFEST_NAME, check_manifest_layers, read_manifest
    from .models.family import family_for_model_type
    from .models.loading import _check_hf_dir
    from .models.synthetic import tensor_plan

    p = _dir_of(spec)
    if p is None:
        raise ModelLoadError(f"{spec} is not a model directory")
    _check_hf_dir(p)
    try:
        cfg = AutoConfig.from_pretrained(p, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - corrupt json, unknown architecture
        raise ModelLoadError(f"cannot read {p / 'config.json'}: {e}") from e
    family = family_for_model_type(cfg.model_type)
    plan = {s.name: s.shape for s in tensor_plan(cfg)}
    shards = _Shards(p)
    packed = {n[: -len(".weight")]: b for n in plan if n.endswith(".weight") and n not in shards.where
              for b in [_bitmask_base(shards, n[: -len(".weight")])] if b is not None}  # a bitmask export
    missing = [n for n in plan if n not in shards.where and n[: -len(".weight")] not in packed]
    if missing:
        raise ModelLoadError(
            f"{p} lacks {len(missing)} weight tensor(s) its config.json needs ({', '.join(missing[:3])}"
            f"{'...' if len(missing) > 3 else ''}); the files are incomplete or corrupt: copy the model again")
    linears = [f"{family.blocks_path}.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in family.linear_names]
    for n in linears:
        got = (tuple(int(x) for x in shards.read_small(packed[n] + ".shape")) if n in packed
               else tuple(shards.entry(n + ".weight")[2]))
        if got != plan[n + ".weight"]:
            raise ModelLoadError(f"cannot load the weights in {p}: {n}.weight has shape {list(got)} but config.json "
                                 f"needs {list(plan[n + '.weight'])}; the files do not match the config")
    manifest = None
    if (p / MANIFEST_NAME).exists():
        if verify:
            manifest = read_manifest(p)
        else:
            try:
                manifest = read_manifest(p)
            except SparseRuntimeError:
                manifest = None
    if manifest is not None and verify:
        check_manifest_layers(linears, manifest)
    if trust_manifest:
        if manifest is None:
            raise ManifestError(f"--trust-manifest: {p} has no sparsity manifest to trust; drop the flag to scan "
                                "the weights")
        layers = []
        for n in linears:
            rec = manifest.layers[n]
            shape = tuple(int(s) for s in rec.shape)
            if shape != tuple(plan[n + ".weight"]):
                raise ManifestError(f"the sparsity manifest disagrees with the weights: {n}: shape "
                                    f"{list(plan[n + '.weight'])} != manifest {rec.shape}")
            layers.append(LayerSparsity(n, shape, 1.0 - rec.nnz / max(1, shape[0] * shape[1]),
                                        implied_patterns(rec.structure, patterns)))
        return DirectoryInspection(SparsityReport(layers), None, manifest, family, str(spec), from_manifest=True)
    from .progress import progress

    note = None
    shapes = {n: tuple(plan[n + ".weight"]) for n in linears}
    if manifest is not None and verify and not packed and not full_scan:
        fast, note = _scan_masks_file(p, shards, shapes, patterns, manifest)
        if fast is not None:
            layers = [LayerSparsity(s.name, s.shape, s.sparsity, [c for c in patterns if c in s.nm])
                      for s in fast.values()]
            return DirectoryInspection(SparsityReport(layers), fast, manifest, family, str(spec), from_masks=True)
    export = _bitmask_export_record(p) if packed else None
    scans: dict[str, LayerScan] = {}
    for n in progress(linears, desc="inspect", unit="layer"):
        shape = plan[n + ".weight"]
        pats = list(patterns)
        rec = manifest.layers.get(n) if manifest is not None else None
        if rec is not None and isinstance(parse_structure(_safe_structure(rec.structure)), NMPattern):
            pats.append(str(parse_structure(rec.structure)))
        if tensor_read is not None:
            tensor_read(n)
        chunks = (shards.keep_chunks(packed[n] + ".bitmask", chunk_elems, bitmask_of=shape) if n in packed
                  else shards.keep_chunks(n + ".weight", chunk_elems))
        sink = mask_sink if mask_sink is not None and not packed else None
        if sink is not None:
            sink.begin(n, shape)
        nnz, dig, ok = scan_rows(chunks, shape, list(dict.fromkeys(pats)),
                                 digest=digests or full_scan or manifest is not None or export is not None,
                                 on_packed=sink.write if sink is not None else None)
        if sink is not None:
            sink.end()
        if n in packed and shards.numel(packed[n] + ".compressed") != nnz:
            raise ModelLoadError(f"corrupt bitmask export {p}: {n} has {nnz} ones in its bitmask but "
                                 f"{shards.numel(packed[n] + '.compressed')} stored values: export again")
        scans[n] = LayerScan(n, shape, nnz, dig, ok)
    if manifest is not None and verify:
        compare_with_manifest(scans, manifest)
    export_ok = None
    if export is not None and verify:
        h = hashlib.sha256()
        for name in sorted(scans):
            h.update(f"{name}={scans[name].digest};".encode())
        if h.hexdigest() != export:
            raise ManifestError(f"the export manifest of {p} records other masks than its bitmasks hold (tampered or "
                                "corrupt export): export again")
        export_ok = True
    masks_ok = None
    if full_scan and not packed:
        masks_ok = _check_masks_file(p, shards, shapes, scans)
    layers = [LayerSparsity(s.name, s.shape, s.sparsity, [c for c in patterns if c in s.nm]) for s in scans.values()]
    return DirectoryInspection(SparsityReport(layers), scans, manifest, family, str(spec),
                               export_masks_verified=export_ok, bitmask_layers=len(packed), masks_note=note,
                               masks_file_matches=masks_ok)


def _scan_masks(masks, shapes: dict[str, tuple[int, int]], patterns: Sequence[str], manifest) -> dict[str, LayerScan]:
    """Every layer's :class:`LayerScan` read off the masks file (the scan's patterns: the candidates
    and the manifest's recorded N:M)."""
    from .progress import progress

    out = {}
    for n in progress(list(shapes), desc="inspect (masks)", unit="layer"):
        pats = list(patterns)
        rec = manifest.layers.get(n) if manifest is not None else None
        if rec is not None and isinstance(_safe_structure(rec.structure), NMPattern):
            pats.append(str(parse_structure(rec.structure)))
        nnz, dig, ok = scan_packed(masks.chunks(n), shapes[n], list(dict.fromkeys(pats)), digest=True)
        out[n] = LayerScan(n, shapes[n], nnz, dig, ok)
    return out


def _scan_masks_file(p: Path, shards: "_Shards", shapes: dict[str, tuple[int, int]], patterns: Sequence[str],
                     manifest) -> tuple[Optional[dict[str, LayerScan]], Optional[str]]:
    """The scans read off the masks file when it can stand for the weights (present, readable, the
    weight files' fingerprints unchanged, every layer agreeing with the manifest), else (None, why)."""
    from .errors import ManifestError
    from .masks_file import MasksFile, MasksFileError, fingerprint, stale_reason, weight_files

    try:
        masks = MasksFile.open(p, shapes)
    except MasksFileError as e:
        return None, str(e)
    why = stale_reason(masks.weight_files, fingerprint(p, weight_files(p, shards)))
    if why is not None:
        return None, why
    try:
        scans = _scan_masks(masks, shapes, patterns, manifest)
    except SparseRuntimeError as e:  # truncated under us
        return None, f"the masks file is unusable ({e})"
    try:
        compare_with_manifest(scans, manifest)
    except ManifestError:
        return None, "the masks file disagrees with the manifest"
    return scans, None


def _check_masks_file(p: Path, shards: "_Shards", shapes: dict[str, tuple[int, int]],
                      scans: dict[str, LayerScan]) -> Optional[bool]:
    """``--verify``: the masks file, if any, against the scanned weights (nonzeros and digests);
    None without one, True when it agrees, an error naming the layers when not."""
    from .errors import ManifestError
    from .masks_file import MASKS_NAME, MasksFile, MasksFileError

    if not (p / MASKS_NAME).exists():
        return None
    fix = f"rebuild it from the weights with `sparse-runtime inspect {p} --write-manifest`"
    try:
        masks = MasksFile.open(p, shapes)
    except MasksFileError as e:
        raise ManifestError(f"--verify: {p / MASKS_NAME}: {str(e)[0].lower() + str(e)[1:]}; {fix}") from None
    got = _scan_masks(masks, shapes, (), None)
    bad = [n for n, s in scans.items() if (got[n].nnz, got[n].digest) != (s.nnz, s.digest)]
    if bad:
        raise ManifestError(f"--verify: {p / MASKS_NAME} disagrees with the weights in {len(bad)} layer(s) "
                            f"({', '.join(bad[:3])}{'...' if len(bad) > 3 else ''}); {fix}")
    return True


def _bitmask_base(shards: "_Shards", layer: str) -> Optional[str]:
    """The prefix of ``layer``'s compressed-bitmask entries (either naming style), or None."""
    for base in (layer, layer + ".weight"):
        if all(f"{base}.{part}" in shards.where for part in ("bitmask", "compressed", "shape")):
            return base
    return None


def _bitmask_export_record(p: Path) -> Optional[str]:
    """The combined mask digest a bitmask export's ``export_manifest.json`` records, if any."""
    f = p / "export_manifest.json"
    try:
        data = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return None
    src = data.get("source") if isinstance(data, dict) else None
    value = src.get("masks_sha256") if isinstance(src, dict) else None
    return value if isinstance(value, str) and data.get("export_format") == "bitmask" else None


def _safe_structure(text):
    try:
        return parse_structure(text)
    except Exception:  # noqa: BLE001 - a bad structure is reported by the comparison, not here
        return None


def compare_with_manifest(scans: dict[str, LayerScan], manifest) -> None:
    """``verify_manifest``'s per-layer check on scans instead of loaded weights (the same
    functions, the same words), so a manifest that disagrees with the tensors never passes,
    whichever path read them."""
    from .manifest import check_layer_facts, check_manifest_layers, raise_if_bad

    check_manifest_layers(list(scans), manifest)
    raise_if_bad([msg for name, rec in manifest.layers.items()
                  if (msg := check_layer_facts(name, scans[name].shape, scans[name].nnz, scans[name].digest,
                                               lambda p, s=scans[name]: str(p) in s.nm, rec)) is not None])