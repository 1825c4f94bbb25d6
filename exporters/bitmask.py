"""Compressed bitmask: nonzero values plus a 1-bit-per-weight mask (compressed-tensors' former
``sparse-bitmask`` layout).

compressed-tensors <= 0.14 stored each compressed weight ``W[R, C]`` of layer ``<layer>`` as four
safetensors entries (``sparse_bitmask.py``, last release before the sparse compressors were removed
in 0.15):

- ``<layer>.compressed``: 1-D, the nonzero values in row-major order, in the weight's dtype;
- ``<layer>.bitmask``: uint8 ``R x ceil(C/8)``, ``numpy.packbits(W != 0, axis=-1, bitorder="little")``;
- ``<layer>.shape``: int64 ``[[R], [C]]`` (the dense shape, reshaped to ``(-1, 1)``);
- ``<layer>.row_offsets``: int64 ``[R]``, the index in ``compressed`` where each row starts.

``<layer>`` is the weight name without its ``.weight`` suffix (the last releases dropped it; older
ones kept it, and :func:`decompress_state_dict` reads both). Every other tensor is stored dense
under its usual name, so the file is an ordinary safetensors file. We write it for interoperability
and for the on-disk size. The file is named ``model.bitmask.safetensors`` so that a client that
does not know the layout fails loudly instead of misreading it (see ``WEIGHTS_NAME``). Current vLLM
and transformers refuse a ``sparsity_config``, so by default config.json gets none
(``write_sparsity_config=True`` adds the compressed-tensors 0.14 block for legacy tools).

Size: per weight ``bits(dtype) * (1 - s) + 1`` bits plus 8 bytes per row, against ``bits(dtype)``
dense. A layer is compressed only when that is smaller (float32: sparsity above ~3 %).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sparse_runtime.errors import ConfigError, ModelLoadError
from sparse_runtime.models.loading import _dtype

from . import CommonOptions, EXPORTERS, Exporter
from .source import Source, dense_state_dict
from .verify import (check_layer_masks, compare_logits, fixed_prompt_ids, summarize, torch_reference)

# Not ``model.safetensors``: plain ``transformers`` ``from_pretrained`` would find that name, skip the
# ``.compressed``/``.bitmask`` entries it does not know and leave every compressed layer randomly
# initialised with only a warning. Under this name it finds no weights and raises instead; our
# :func:`load_bitmask` and compressed-tensors' ``BitmaskCompressor.decompress(path)`` read it.
WEIGHTS_NAME = "model.bitmask.safetensors"
LEGACY_WEIGHTS_NAME = "model.safetensors"  # exports written before the rename
PARAM_NAMES = ("shape", "compressed", "bitmask", "row_offsets")
CT_VERSION = "0.14.0.1"


def pack_bitmask(keep: torch.Tensor) -> torch.Tensor:
    """``R x C`` bool -> uint8 ``R x ceil(C/8)``, little bit order (bit j of byte k = column 8k+j)."""
    return torch.from_numpy(np.packbits(keep.cpu().numpy().astype(bool), axis=-1, bitorder="little"))


def unpack_bitmask(packed: torch.Tensor, shape) -> torch.Tensor:
    bits = np.unpackbits(packed.cpu().numpy(), axis=-1, count=int(shape[-1]), bitorder="little")
    return torch.from_numpy(bits.reshape(tuple(int(s) for s in shape)).astype(bool))


def bitmask_compress(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compress a 2-D tensor. ``-0.0`` counts as zero (it is dropped and comes back as ``+0.0``)."""
    if w.ndim != 2:
        raise ConfigError(f"bitmask compression takes 2-D weights, got shape {tuple(w.shape)}")
    w = w.detach().cpu().contiguous()
    keep = w != 0
    counts = keep.sum(-1)
    return {
        "shape": torch.tensor(list(w.shape), dtype=torch.int64).reshape(-1, 1),
        "compressed": w[keep].contiguous(),
        "bitmask": pack_bitmask(keep),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def bitmask_decompress(compressed: torch.Tensor, bitmask: torch.Tensor, shape) -> torch.Tensor:
    shape = [int(s) for s in torch.as_tensor(shape).reshape(-1).tolist()]
    keep = unpack_bitmask(bitmask, shape)
    if int(keep.sum()) != compressed.numel():
        raise ModelLoadError(f"corrupt bitmask tensor: mask has {int(keep.sum())} ones but there are "
                             f"{compressed.numel()} values")
    out = torch.zeros(shape, dtype=compressed.dtype)
    out[keep] = compressed
    return out


def compressed_bytes(w: torch.Tensor) -> int:
    nnz = int((w != 0).sum())
    r, c = w.shape
    return nnz * w.element_size() + r * ((c + 7) // 8) + r * 8 + 16


def decompress_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn a sparse-bitmask state dict (either naming style) back into dense tensors."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        base, _, last = k.rpartition(".")
        if last in PARAM_NAMES and base:
            groups.setdefault(base, {})[last] = v
        else:
            out[k] = v
    for base, parts in groups.items():
        if set(parts) != set(PARAM_NAMES):  # e.g. a real parameter that happens to be named 'shape'
            out.update({f"{base}.{p}": t for p, t in parts.items()})
            continue
        name = base if base.endswith(".weight") else f"{base}.weight"
        out[name] = bitmask_decompress(parts["compressed"], parts["bitmask"], parts["shape"])
    return out


@dataclass
class BitmaskOptions(CommonOptions):
    """``min_sparsity``: compress a layer only at or above this sparsity (and only when that makes it
    smaller); ``write_sparsity_config``: add compressed-tensors 0.14's ``quantization_config`` to
    config.json for legacy tools (current vLLM/transformers refuse it, so off by default)."""

    min_sparsity: float = 0.0
    write_sparsity_config: bool = False

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= float(self.min_sparsity) < 1.0:
            raise ConfigError(f"min_sparsity must be in [0, 1), got {self.min_sparsity}")


@EXPORTERS.register("bitmask")
class BitmaskExporter(Exporter):
    name = "bitmask"
    Options = BitmaskOptions
    description = ("safetensors with compressed-tensors 0.14 sparse-bitmask tensors (<layer>.compressed, "
                   ".bitmask, .shape, .row_offsets) for pruned linears; all other tensors dense")

    def write(self, src: Source, out: Path, opts: BitmaskOptions) -> dict[str, Any]:
        from safetensors.torch import save_file

        dt = _dtype(opts.dtype)
        sd = {k: v.to(dt) if v.is_floating_point() else v for k, v in dense_state_dict(src.model).items()}
        targets = {f"{n}.weight" for n in src.manifest.layers}
        tensors: dict[str, torch.Tensor] = {}
        compressed, dense_bytes, layer_info = [], 0, {}
        for k, v in sd.items():
            dense_bytes += v.numel() * v.element_size()
            s = float((v == 0).sum()) / max(1, v.numel())
            if k in targets and v.ndim == 2 and s >= opts.min_sparsity and compressed_bytes(v) < v.numel() * v.element_size():
                layer = k[: -len(".weight")]
                for p, t in bitmask_compress(v).items():
                    tensors[f"{layer}.{p}"] = t
                compressed.append(layer)
                layer_info[layer] = {"sparsity": s, "shape": list(v.shape)}
            else:
                tensors[k] = v
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "sparse_format": "sparse-bitmask"})
        src.copy_side_files(out)
        if opts.write_sparsity_config:
            self._write_ct_config(out, src, compressed)
        size = (out / WEIGHTS_NAME).stat().st_size
        return {"weights": WEIGHTS_NAME, "dtype": opts.dtype, "compressed_layers": len(compressed),
                "dense_layers_kept": len(targets) - len(compressed), "layers": layer_info,
                "bytes_on_disk": size, "dense_bytes": dense_bytes, "size_ratio": size / max(1, dense_bytes),
                "sparsity_config_written": opts.write_sparsity_config}

    def write_streamed(self, path: Path, spec: str, out: Path, opts: BitmaskOptions):
        """:meth:`write` and :meth:`verify` tensor by tensor from ``path``'s shards (a model larger
        than memory): each pruned layer is compressed, decompressed again and compared bit for bit,
        and its mask checked against the sparsity manifest, before the next one is read; the
        output is sharded like the input (``model.bitmask[-0000i-of-0000n].safetensors`` plus
        ``model.bitmask.safetensors.index.json`` when more than one). The logits comparison of
        :meth:`verify` needs the whole model and is replaced by these per-layer checks."""
        import hashlib
        import shutil

        from sparse_runtime.manifest import MANIFEST_NAME, check_layer, layer_record, read_manifest
        from sparse_runtime.models.streaming import SIDE_FILES, CheckpointReader, ShardWriter, StreamedModel

        sm = StreamedModel(path, opts.dtype)  # the skeleton: names, family, manifest checks
        reader: CheckpointReader = sm.reader
        manifest = sm.manifest
        dt = _dtype(opts.dtype)
        layer_names = {f"{n}.weight": n for n, _ in sm.family.iter_linears(sm.model)}
        writer = ShardWriter(out, metadata={"format": "pt", "sparse_format": "sparse-bitmask"}, stem="model.bitmask")
        compressed, dense_bytes, layer_info, bad, records = [], 0, {}, [], {}
        from sparse_runtime.progress import progress

        for k in progress(reader.names(), desc="bitmask export (streamed)"):
            v = reader.get(k)
            v = v.to(dt) if v.is_floating_point() else v
            dense_bytes += v.numel() * v.element_size()
            layer = layer_names.get(k)
            if layer is not None:
                rec = manifest.layers[layer] if manifest is not None else layer_record(v)
                records[layer] = rec
                if manifest is not None and (msg := check_layer(layer, v, rec)) is not None:
                    bad.append(msg)
                s = 1.0 - rec.nnz / max(1, v.numel())
                if v.ndim == 2 and s >= opts.min_sparsity and compressed_bytes(v) < v.numel() * v.element_size():
                    parts = bitmask_compress(v)
                    if not torch.equal(bitmask_decompress(parts["compressed"], parts["bitmask"], parts["shape"]), v):
                        bad.append(f"{layer}: the compressed form does not decompress to the weight")
                    base = k[: -len(".weight")]
                    for p_, t in parts.items():
                        writer.add(f"{base}.{p_}", t)
                    compressed.append(base)
                    layer_info[base] = {"sparsity": s, "shape": list(v.shape)}
                    continue
            writer.add(k, v)
            del v
        files = writer.close()
        for f in ("config.json", *SIDE_FILES):
            if (path / f).is_file():
                shutil.copyfile(path / f, out / f)
        h = hashlib.sha256()
        for name in sorted(records):
            h.update(f"{name}={records[name].mask_sha256};".encode())
        total = sum(r.nnz for r in records.values())
        numel = sum(int(np.prod(r.shape)) for r in records.values())
        source = {"spec": spec, "path": str(path), "family": sm.family.name, "model_type": sm.config.model_type,
                  "base_model": (manifest.base_model if manifest is not None else "") or spec,
                  "sparsity_manifest": MANIFEST_NAME if manifest is not None else None,
                  "sparsity_manifest_sha256": hashlib.sha256((path / MANIFEST_NAME).read_bytes()).hexdigest()
                  if manifest is not None else None,
                  "masks_sha256": h.hexdigest(), "total_sparsity": 1.0 - total / max(1, numel),
                  "layers": len(records), "structures": sorted({r.structure for r in records.values()})}
        if opts.write_sparsity_config:
            self._update_ct_config(out, source["total_sparsity"], compressed)
        size = sum((out / f).stat().st_size for f in files)
        contents = {"weights": files[0] if len(files) == 1 else f"model.bitmask.safetensors.index.json ({len(files)} shards)",
                    "dtype": opts.dtype, "compressed_layers": len(compressed),
                    "dense_layers_kept": len(layer_names) - len(compressed), "layers": layer_info,
                    "bytes_on_disk": size, "dense_bytes": dense_bytes, "size_ratio": size / max(1, dense_bytes),
                    "sparsity_config_written": opts.write_sparsity_config, "streamed": True}
        report = {"ok": not bad, "logits": [], "masks": {"problems": bad[:10], "layers": len(records),
                                                   "matched": len(records) - len(bad)},
                  "per_layer": "compress/decompress bitwise equal and masks equal to the sparsity manifest, "
                               "layer by layer (the logits check needs the whole model in memory)"}
        return contents, report, source

    @staticmethod
    def _write_ct_config(out: Path, src: Source, compressed: list[str]) -> None:
        BitmaskExporter._update_ct_config(out, src.manifest.total_measured, compressed)

    @staticmethod
    def _update_ct_config(out: Path, total_sparsity: float, compressed: list[str]) -> None:
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "version": CT_VERSION, "format": "dense",
            "config_groups": {}, "quantization_status": "compressed",
            "sparsity_config": {"format": "sparse-bitmask", "global_sparsity": total_sparsity,
                                "sparsity_structure": "unstructured", "targets": compressed,
                                "ignore": [], "registry_requires_subclass": False},
        }
        cfg_path.write_text(json.dumps(cfg, indent=2))

    def verify(self, src: Source, out: Path, opts: BitmaskOptions, contents: dict[str, Any]) -> dict[str, Any]:
        model = load_bitmask(out, dtype=opts.dtype)
        fam = src.family
        exported = {n: lin.weight.detach() for n, lin in fam.iter_linears(model)}
        exact = all(torch.equal(exported[n], lin.weight.detach().to(_dtype(opts.dtype)))
                    for n, lin in src.linears().items())
        masks = check_layer_masks(src.manifest, exported, opts.dtype)
        ids = fixed_prompt_ids(src.tokenizer, model.config.vocab_size)
        ref = torch_reference(src.model, ids, decode=False)
        with torch.no_grad():
            got = model(input_ids=ids).logits.float()
        checks = [compare_logits("prefill", ref["prefill"], got, opts.dtype)]
        rep = summarize(checks, masks, {"weights_bitwise_equal": exact})
        rep["ok"] = rep["ok"] and exact
        return rep

    def notes(self, opts) -> list[str]:
        return ["layout of compressed-tensors 0.14 sparse-bitmask; -0.0 is stored as zero",
                "no engine runs this layout directly today: it is a storage/interchange format"]


def load_bitmask(path, dtype: Optional[str] = None, device: str = "cpu"):
    """Rebuild the dense PyTorch model from a bitmask export."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    f = path / WEIGHTS_NAME
    index = path / f"{WEIGHTS_NAME}.index.json"
    if not f.is_file() and (path / LEGACY_WEIGHTS_NAME).is_file():
        f = path / LEGACY_WEIGHTS_NAME
    if index.is_file():  # a streamed export of a large model: shards
        files = [path / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif f.is_file():
        files = [f]
    else:
        raise ModelLoadError(f"{path} holds no {WEIGHTS_NAME}; is it a bitmask export?")
    cfg = AutoConfig.from_pretrained(path)
    cfg.__dict__.pop("quantization_config", None)  # we decompress ourselves
    raw: dict[str, torch.Tensor] = {}
    for part in files:
        raw.update(load_file(str(part)))
    sd = decompress_state_dict(raw)
    dt = _dtype(dtype) if dtype else next(v.dtype for v in sd.values() if v.is_floating_point())
    model = AutoModelForCausalLM.from_config(cfg, dtype=dt, attn_implementation="eager")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise ModelLoadError(f"{f} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.to(device).eval()
