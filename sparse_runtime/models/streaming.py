"""Streaming model access: a model is a directory of safetensors shards, one block in memory at a time.

Why: a 7B model in fp32 is 27 GB, more than the 24 GB machines our users prune on, and every
one-shot method already works block by block (docs/methods.md#the-sequential-driver). So the
model's module skeleton is built on the ``meta`` device (no memory), the embedding is read when the
calibration inputs are caught, and each decoder block is read from the shards (per tensor, through
``pread``) in the compute dtype only while it is worked on, then handed to a sink
(which writes it out) and released. Peak memory is one block, the calibration activations and the
method's statistics, whatever the depth (docs/scale.md#streaming).

- :class:`CheckpointReader`: tensor names, shapes, dtypes and offsets from the safetensors headers;
  one tensor at a time on request, read with ``pread`` (never a memory map).
- :class:`ShardWriter`: writes tensors into shards as they come (each shard at most
  ``max_shard_bytes``), then the standard ``model.safetensors.index.json`` (or one
  ``model.safetensors``), so Hugging Face loaders read the result unchanged.
- :class:`StreamedModel`: the skeleton plus the reader; ``load_block`` / ``release_block`` (with a
  counter of live blocks, which the tests use to prove the bound), ``load_head`` for perplexity.
- :func:`estimate_stream_peak` and :func:`available_memory`: the refusal before any work starts
  when even one block and its activations cannot fit.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError
from .family import FamilyAdapter, family_for_model_type

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB: the writer's buffer is part of the memory bound
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # safetensors dtype names
# Files a Hugging Face directory carries beside its weights, copied unchanged into an output.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


ITEMSIZE = {"F32": 4, "F64": 8, "BF16": 2, "F16": 2, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
INDEX_NAMES = (INDEX_NAME, "model.bitmask.safetensors.index.json")


class CheckpointReader:
    """The tensors of a Hugging Face directory's safetensors files, read lazily.

    Only the headers are read at construction (names, shapes, dtypes, byte offsets; the format:
    an 8-byte little-endian header length, a JSON header, the data). ``get(name)`` reads one tensor
    with ``pread`` into fresh memory and then drops its pages from the page cache, instead of
    mapping the file: a mapped file's pages stay in the process's resident set and are charged to
    its memory cgroup while the mapping lives, which on a 27 GB model makes the resident figure a
    user reads (and the cgroup's usage) meaningless. Nothing is cached: the caller decides what
    lives."""

    def __init__(self, path: os.PathLike) -> None:
        self.path = Path(path)
        self.headers: dict[str, tuple[int, dict]] = {}  # file -> (data start, header)
        index = next((self.path / n for n in INDEX_NAMES if (self.path / n).is_file()), None)
        self.file_of: dict[str, str] = {}
        if index is not None:
            try:
                self.file_of = {str(k): str(v) for k, v in json.loads(index.read_text())["weight_map"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ModelLoadError(f"{index} is not a safetensors index ({e}); copy the model again") from e
        else:
            for f in sorted(self.path.glob("*.safetensors")):
                for name in self.header(f.name)[1]:
                    if name != "__metadata__":
                        self.file_of.setdefault(name, f.name)
        if not self.file_of:
            raise ModelLoadError(f"{self.path} has no *.safetensors weights")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.st_dtypes: dict[str, str] = {}
        for name in self.file_of:
            _, _, shape, st = self.entry(name)
            self.shapes[name], self.st_dtypes[name] = shape, st
            self.dtypes[name] = _DTYPES.get(st, torch.float32)

    def header(self, fname: str) -> tuple[int, dict]:
        """(data start, parsed header) of one file, read once."""
        if fname not in self.headers:
            f = self.path / fname
            if not f.is_file():
                raise ModelLoadError(f"{self.path} lacks the shard {fname} its index names; copy the model again")
            size = f.stat().st_size
            try:
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    if not 0 < n <= min(size - 8, 100 << 20):
                        raise ValueError("header length out of range")
                    head = json.loads(fh.read(n))
                if not isinstance(head, dict):
                    raise ValueError("header is not an object")
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"cannot load the weights in {self.path}: {fname} is not a valid safetensors "
                                     f"file ({e}); copy the model again") from e
            self.headers[fname] = (8 + n, head)
        return self.headers[fname]

    def entry(self, name: str) -> tuple[str, int, tuple[int, ...], str]:
        """(file, absolute byte offset, shape, safetensors dtype) of tensor ``name``, checked
        against the file's size (a truncated shard is one clear line, not garbage)."""
        try:
            fname = self.file_of[name]
        except KeyError:
            raise ModelLoadError(f"{self.path} lacks the weight tensor {name}; the files are incomplete or "
                                 "corrupt: copy the model again") from None
        start, head = self.header(fname)
        e = head.get(name)
        try:
            shape = tuple(int(s) for s in e["shape"])
            lo, hi = (int(x) for x in e["data_offsets"])
            dtype = str(e["dtype"])
        except (TypeError, KeyError, ValueError) as err:
            raise ModelLoadError(f"cannot load the weights in {self.path}: {fname} has no valid entry for {name}; "
                                 "copy the model again") from err
        n = 1
        for s in shape:
            n *= s
        size = (self.path / fname).stat().st_size
        if dtype not in ITEMSIZE or hi - lo != n * ITEMSIZE[dtype] or start + hi > size:
            raise ModelLoadError(f"cannot load the weights in {self.path}: {fname}'s entry for {name} does not fit "
                                 "the file (truncated or corrupt); copy the model again")
        return fname, start + lo, shape, dtype

    def names(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, in fresh (anonymous) memory: freeing it frees it."""
        fname, off, shape, st = self.entry(name)
        out = torch.empty(shape, dtype=_DTYPES[st])
        raw = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        nbytes = out.numel() * ITEMSIZE[st]
        fd = os.open(self.path / fname, os.O_RDONLY)
        try:
            got = 0
            while got < nbytes:
                k = os.preadv(fd, [memoryview(raw)[got:]], off + got)
                if k <= 0:
                    raise ModelLoadError(f"{self.path / fname} ended early reading {name}; copy the model again")
                got += k
            if hasattr(os, "posix_fadvise") and nbytes:
                os.posix_fadvise(fd, off, nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return out

    def nbytes(self, name: str) -> int:
        n = 1
        for s in self.shapes[name]:
            n *= s
        return n * ITEMSIZE[self.st_dtypes[name]]

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shapes[name]:
            n *= s
        return n

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.file_of)

    def storage_dtype(self, names: Optional[Iterable[str]] = None) -> torch.dtype:
        """The floating dtype holding most of ``names``' elements (default: every tensor)."""
        c: Counter = Counter()
        for n in (names if names is not None else self.file_of):
            if n in self.dtypes and self.dtypes[n].is_floating_point:
                c[self.dtypes[n]] += self.numel(n)
        return c.most_common(1)[0][0] if c else torch.float32


class ShardWriter:
    """Write tensors into safetensors shards as they come, then the Hugging Face index.

    Tensors are buffered until the next one would take the buffer past ``max_shard_bytes``; the
    buffer is then written as one shard and freed. ``close()`` names the shards
    ``model-0000i-of-0000n.safetensors`` and writes ``model.safetensors.index.json`` (one shard:
    ``model.safetensors``, no index), as ``save_pretrained`` does."""

    def __init__(self, directory: os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: Optional[dict[str, str]] = None, stem: str = "model") -> None:
        self.dir = Path(directory)
        self.stem = stem  # "model": model.safetensors / model-00001-of-00002.safetensors + the index
        self.max = int(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._parts: list[tuple[str, list[str]]] = []
        self.total_size = 0
        self.written: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.written or name in self._buf:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().to("cpu").contiguous()
        nb = t.numel() * t.element_size()
        if self._buf and self._buf_bytes + nb > self.max:
            self.flush()
        self._buf[name] = t
        self._buf_bytes += nb
        self.total_size += nb

    def flush(self) -> None:
        from safetensors.torch import save_file

        from ..faults import fault_point

        if not self._buf:
            return
        part = f".part-{len(self._parts):05d}.safetensors"
        save_file(self._buf, str(self.dir / part), metadata=self.metadata)
        fault_point("shard")  # test hook (sparse_runtime/faults.py)
        self._parts.append((part, list(self._buf)))
        self.written.update(self._buf)
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is buffered, give the shards their final names; returns the file names."""
        self.flush()
        n = len(self._parts)
        if n == 0:
            raise ValueError("no tensor was written")
        if n == 1:
            os.replace(self.dir / self._parts[0][0], self.dir / f"{self.stem}.safetensors")
            return [f"{self.stem}.safetensors"]
        weight_map, names = {}, []
        for i, (part, tensors) in enumerate(self._parts):
            final = f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / part, self.dir / final)
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def _torch_dtype(dtype) -> torch.dtype:
    from .loading import _dtype

    return _dtype(dtype)


class StreamedModel:
    """A Hugging Face directory as a module skeleton on ``meta`` plus its lazily read tensors.

    Only what is asked for is ever in memory: :meth:`load_embed` (for catching the calibration
    inputs), one block at a time (:meth:`load_block` / :meth:`release_block`), and the final norm
    and head (:meth:`load_head`) for perplexity. ``live_blocks`` / ``max_live_blocks`` count the
    materialised blocks, so a test can prove the bound."""

    def __init__(self, path: os.PathLike, dtype="float32", *, trust_remote_code: bool = False,
                 attn_implementation: str = "sdpa", verify_manifest: bool = True) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        from .loading import _check_hf_dir

        self.path = Path(path)
        _check_hf_dir(self.path)
        try:
            self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise ModelLoadError(f"cannot read {self.path / 'config.json'}: {e}") from e
        self.family: FamilyAdapter = family_for_model_type(self.config.model_type)
        self.dtype = _torch_dtype(dtype)
        self.reader = CheckpointReader(self.path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype,
                                                     attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code)
        model.eval()
        model.config.use_cache = False
        # Non-persistent buffers (the rotary tables) are computed, not stored: rebuild them on CPU.
        inner = getattr(model, "model", model)
        rot = getattr(inner, "rotary_emb", None)
        if rot is not None:
            inner.rotary_emb = type(rot)(config=model.config, device="cpu")
        self.model = model
        self.blocks = self.family.blocks(model)
        self.n_blocks = len(self.blocks)
        self.live_blocks = 0
        self.max_live_blocks = 0
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self.storage_dtype = self.reader.storage_dtype(self.block_tensor_names())
        self._check_tensors()
        # our checkpoints: the sparsity manifest is checked block by block as the blocks are read
        # (names now, masks on first load), as load_model checks it on the whole model
        from ..manifest import MANIFEST_NAME, check_manifest_layers, read_manifest

        self.manifest = read_manifest(self.path) if (self.path / MANIFEST_NAME).exists() else None
        self._verified: set[int] = set()
        self.verify = verify_manifest and self.manifest is not None
        if self.verify:
            check_manifest_layers([n for n, _ in self.family.iter_linears(self.model)], self.manifest)

    # -- names ------------------------------------------------------------------------------------
    def block_prefix(self, i: int) -> str:
        return f"{self.family.blocks_path}.{i}."

    def block_tensor_names(self) -> list[str]:
        pat = re.compile(re.escape(self.family.blocks_path) + r"\.\d+\.")
        return [n for n in self.reader.names() if pat.match(n)]

    def _check_tensors(self) -> None:
        """Every parameter of the skeleton must be in the files (transformers would fill a missing
        one with random values and only warn)."""
        names = set(self.reader.names())
        missing = [n for n, _ in self.model.named_parameters() if n not in names
                   and not (self.tied and n == f"{self.family.head_path}.weight")]
        if missing:
            raise ModelLoadError(
                f"{self.path} lacks {len(missing)} weight tensor(s) its config.json needs ({', '.join(missing[:3])}"
                f"{'...' if len(missing) > 3 else ''}); the files are incomplete or corrupt: copy the model again")
        for n, p in self.model.named_parameters():
            if n in names and tuple(p.shape) != self.reader.shapes[n]:
                raise ModelLoadError(f"{self.path}: {n} has shape {self.reader.shapes[n]} in the files but "
                                     f"{tuple(p.shape)} in config.json; the model is inconsistent")

    # -- materialising ----------------------------------------------------------------------------
    def _fill(self, module: nn.Module, prefix: str) -> nn.Module:
        module.to_empty(device="cpu")
        with torch.no_grad():
            for n, p in module.named_parameters(recurse=True):
                p.copy_(self.reader.get(prefix + n))
        return module

    def load_embed(self) -> nn.Module:
        embed = self.family.embed(self.model)
        if next(embed.parameters()).device.type == "meta":
            self._fill(embed, self.family.embed_path + ".")
        return embed

    def release_embed(self) -> None:
        if self.tied and next(self.family.embed(self.model).parameters()).device.type != "meta" and \
                self._head_loaded():
            return  # the head shares it
        self.family.embed(self.model).to("meta")

    def _head_loaded(self) -> bool:
        head = _get(self.model, self.family.head_path)
        return head.weight.device.type != "meta"

    def load_head(self) -> tuple[nn.Module, nn.Module]:
        """The final norm and the LM head (tied: the embedding's weight), for perplexity."""
        norm = _get(self.model, self.family.norm_path)
        if next(norm.parameters()).device.type == "meta":
            self._fill(norm, self.family.norm_path + ".")
        head = _get(self.model, self.family.head_path)
        if head.weight.device.type == "meta":
            if self.tied:
                head.weight = self.load_embed().weight
            else:
                self._fill(head, self.family.head_path + ".")
        return norm, head

    def release_head(self) -> None:
        _get(self.model, self.family.norm_path).to("meta")
        head = _get(self.model, self.family.head_path)
        if self.tied:
            head.weight = nn.Parameter(torch.empty(head.weight.shape, dtype=self.dtype, device="meta"),
                                       requires_grad=False)
        else:
            head.to("meta")

    def load_block(self, i: int) -> nn.Module:
        block = self.blocks[i]
        if next(block.parameters()).device.type == "meta":
            self._fill(block, self.block_prefix(i))
            self.live_blocks += 1
            self.max_live_blocks = max(self.max_live_blocks, self.live_blocks)
            if self.verify and i not in self._verified:
                self._verify_block(i, block)
        return block

    def _verify_block(self, i: int, block: nn.Module) -> None:
        from ..manifest import check_layer, raise_if_bad

        prefix = f"{self.family.blocks_path}.{i}."
        bad = [msg for short, lin in self.family.block_linears(block).items()
               if (msg := check_layer(prefix + short, lin.weight, self.manifest.layers[prefix + short])) is not None]
        if bad:
            self.release_block(i)
        raise_if_bad(bad)
        self._verified.add(i)

    def release_block(self, i: int) -> None:
        block = self.blocks[i]  # a caller may already have released some of its modules
        if any(p.device.type != "meta" for p in block.parameters()):
            block.to("meta")
            self.live_blocks -= 1

    def block_state(self, i: int, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The materialised block's tensors under their checkpoint names, in ``dtype`` (default: the
        storage dtype)."""
        dt = dtype or self.storage_dtype
        prefix = self.block_prefix(i)
        return {prefix + n: t.detach().to(dt) for n, t in self.blocks[i].state_dict().items()
                if prefix + n in self.reader}

    def param_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def block_param_count(self) -> int:
        return max(sum(p.numel() for p in b.parameters()) for b in self.blocks)


def _get(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class BlockStreamer:
    """The hooks :func:`sparse_runtime.calibration.sequential_pass` calls around each block in
    streaming mode: ``load`` reads it (dense, from the input's files), ``done`` hands it to the
    sink (e.g. write it out) and releases it."""

    def __init__(self, streamed: StreamedModel, sink: Optional[Callable[[int, nn.Module], None]] = None) -> None:
        self.streamed, self.sink = streamed, sink

    def load(self, i: int, block: nn.Module) -> None:
        self.streamed.load_block(i)

    def done(self, i: int, block: nn.Module) -> None:
        if self.sink is not None:
            self.sink(i, block)
        self.streamed.release_block(i)


# -- memory: the estimate and what is available ----------------------------------------------------
def available_memory() -> tuple[int, str]:
    """Bytes this process may still use and where the figure comes from: the memory cgroup's limit
    (v2 ``memory.max`` / v1 ``memory.limit_in_bytes``) less its current use, or MemAvailable,
    whichever is smaller."""
    best: Optional[tuple[int, str]] = None
    try:
        meminfo = Path("/proc/meminfo").read_text()
        m = re.search(r"MemAvailable:\s+(\d+) kB", meminfo)
        if m:
            best = (int(m.group(1)) * 1024, "MemAvailable")
    except OSError:
        pass
    cg = _cgroup_room()
    if cg is not None and (best is None or cg[0] < best[0]):
        best = cg
    return best if best is not None else (1 << 62, "unknown")


def _cgroup_room() -> Optional[tuple[int, str]]:
    """Room left under this process's memory cgroup limit (the controller found as the capped
    benchmark runner finds it, :mod:`sparse_runtime.measure.cgroup`), or None without a limit."""
    from ..measure.cgroup import detect_memory_cgroup

    cg, _ = detect_memory_cgroup()
    if cg is None:
        return None
    f = cg.files()
    try:
        text = (cg.parent / f["limit"]).read_text().strip()
        if text == "max" or int(text) >= (1 << 60):
            return None
        limit = int(text)
        usage = cg.parent / f["usage"]
        used = int(usage.read_text().strip()) if usage.exists() else 0
    except (OSError, ValueError):
        return None
    used -= _reclaimable_cache(cg.parent)
    return max(0, limit - max(0, used)), f"cgroup limit {limit / 2**30:.1f} GiB"


def _reclaimable_cache(base: Path) -> int:
    """Page cache charged to the cgroup (file pages): the kernel reclaims it under the limit."""
    try:
        for line in (base / "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k in ("file", "total_cache"):
                return int(v)
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class PeakEstimate:
    """A streamed job's peak, by part (bytes)."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {v / 2**30:.2f}" for k, v in self.parts.items() if v) + " GiB"


def estimate_stream_peak(streamed: StreamedModel, *, nsamples: int, seqlen: int, batch_size: int = 8,
                         needs: Iterable[str] = ("norm",), refiner: bool = False,
                         heldout_tokens: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES) -> PeakEstimate:
    """What a streamed pass holds at its peak: one block in the compute dtype (twice: the block
    and the pruner's working copies), the embedding while the inputs are caught, the calibration
    activations (the block's inputs and outputs), one block forward's intermediates, the method's
    statistics (SparseGPT's Hessian and its inverse for the widest input), the writer's buffer, and
    the interpreter with torch loaded."""
    c = streamed.config
    es = torch.empty((), dtype=streamed.dtype).element_size()
    hidden = int(c.hidden_size)
    inter = int(getattr(c, "intermediate_size", 4 * hidden))
    heads = int(c.num_attention_heads)
    vocab = int(c.vocab_size)
    needs = set(needs)
    b = max(1, min(batch_size, nsamples))
    act = 2 * nsamples * seqlen * hidden * es
    fwd = b * seqlen * (3 * inter + 6 * hidden) * 4 + b * heads * seqlen * seqlen * 4
    stats = 0
    if "hessian" in needs:
        stats = 3 * inter * inter * 4
    elif needs:
        stats = 4 * inter * 4
    parts = {
        "block x2": 2 * streamed.block_param_count() * es,
        "embedding": vocab * hidden * es,
        "activations": act,
        "block forward": fwd,
        "statistics": stats + (2 * streamed.block_param_count() // 7 * 4 if refiner else 0),
        "held-out": heldout_tokens * hidden * es * 2 + (vocab * hidden * es if heldout_tokens else 0),
        "writer buffer": min(shard_bytes, streamed.block_param_count() * 4),
        "runtime": 600 << 20,
    }
    return PeakEstimate(parts)


def check_fits(estimate: PeakEstimate, what: str, fixes: str) -> None:
    """Refuse, before any work, a job whose estimated peak exceeds the memory available."""
    room, where = available_memory()
    if estimate.total > room:
        raise ConfigError(
            f"{what} needs about {estimate.total / 2**30:.1f} GiB at its peak ({estimate.describe()}), but only "
            f"{room / 2**30:.1f} GiB is available ({where}); {fixes}")


class StreamedForward:
    """Token windows carried through a streamed model block by block (no cache, batch 1 per window,
    the same ops as a full forward): ``step(block)`` after each block, then the final norm and head
    through :meth:`logits`. Used for streamed perplexity and ATP's held-out trials."""

    def __init__(self, streamed: StreamedModel, windows: torch.Tensor) -> None:
        from ..calibration import capture_block_inputs

        self.streamed = streamed
        streamed.load_embed()
        try:
            inputs = capture_block_inputs(streamed.model, streamed.family, windows, batch_size=1,
                                          device=torch.device("cpu"))
        finally:
            streamed.release_embed()
        self.hidden, self.kwargs = inputs.hidden, inputs.kwargs

    @torch.no_grad()
    def step(self, block: nn.Module) -> None:
        from ..calibration import _block_forward

        self.hidden = [_block_forward(block, h, self.kwargs) for h in self.hidden]

    @torch.no_grad()
    def logits(self) -> Iterable[torch.Tensor]:
        """Each window's logits [1, T, V] in turn (the head is loaded for this and released after)."""
        norm, head = self.streamed.load_head()
        try:
            for h in self.hidden:
                yield head(norm(h))
        finally:
            self.streamed.release_head()


STREAM_MODES = ("auto", "on", "off")


def stream_path(spec, dtype="float32", mode: str = "auto") -> Optional[Path]:
    """The Hugging Face directory to stream ``spec`` from, or None to load it whole.

    ``on``: always stream (``spec`` must be a Hugging Face directory or the embedded default);
    ``off``: never; ``auto`` (default): stream when the whole model in the compute dtype would take
    more than 60 % of the memory available (so a small model keeps the in-memory path, with the
    same results)."""
    from .loading import DEFAULT_MODEL, ensure_smollm2

    mode = str(mode).lower()
    if mode not in STREAM_MODES:
        raise ConfigError(f"--stream takes {', '.join(STREAM_MODES)}, got {mode!r}")
    if mode == "off":
        return None
    text = str(spec)
    if text.lower() == DEFAULT_MODEL:
        path: Optional[Path] = ensure_smollm2()
    else:
        p = Path(text).expanduser()
        path = p if p.is_dir() and (p / "config.json").is_file() else None
    if path is None:
        if mode == "on":
            raise ConfigError(f"streaming reads a Hugging Face directory of safetensors shards; {text!r} is not one "
                              "(tiny test models and .gguf files load whole): drop --stream on")
        return None
    if mode == "on":
        return path
    reader = CheckpointReader(path)
    es = torch.empty((), dtype=_torch_dtype(dtype)).element_size()
    whole = sum(reader.nbytes(n) // reader.dtypes[n].itemsize * es for n in reader.names())
    room, _ = available_memory()
    return path if whole > 0.6 * room else None
