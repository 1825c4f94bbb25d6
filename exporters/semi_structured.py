"""2:4 semi-structured export: per 2:4 linear, the kept values and their positions.

Layout (``semi_structured.safetensors``), for a 2:4 weight ``W[R, C]`` of layer ``<layer>``:

- ``<layer>.values``: ``R x C/2``, the two kept values of every group of 4 consecutive input
  columns, in column order. This is exactly the "sparse" half PyTorch's CUTLASS packer produces
  (``sparse_semi_structured_from_dense_cutlass``) for 16-bit dtypes;
- ``<layer>.meta``: uint8 ``R x ceil(C/8)``, the positions: each group's two column indices
  ``i0 < i1`` (2 bits each) form a nibble ``i0 | i1 << 2``, two groups per byte (the even group in
  the low nibble). This is the logical 2:4 metadata of NVIDIA's format before the kernel-specific
  reordering, so it is portable (CPU, CUTLASS, cuSPARSELt all derive their layouts from it);
- ``<layer>.shape``: int64 ``[R, C]``.
Every other tensor (embeddings, norms, head, biases) is stored dense in ``dense.safetensors``.

A group with fewer than 2 nonzeros stores explicit zeros at its lowest free positions, so
pack/unpack is exact. A layer that is not 2:4 (a group of 4 with 3 or 4 nonzeros, or C not a
multiple of 4) is refused: silently re-pruning it would change the model. ``-0.0`` counts as zero.

Loading (:func:`load_semi_structured`): on CPU the dense weight is rebuilt (2:4 is only a mask
there: no CPU kernel uses it); on CUDA each packed weight becomes a
``torch.sparse.SparseSemiStructuredTensor`` through ``to_sparse_semi_structured``, with the CUTLASS
or cuSPARSELt backend (``backend="auto"`` picks cuSPARSELt when PyTorch has it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from sparse_runtime.errors import ConfigError, ModelLoadError
from sparse_runtime.models.loading import _dtype
from sparse_runtime.sparsity import NMPattern

from . import CommonOptions, EXPORTERS, Exporter
from .source import Source, dense_state_dict
from .verify import check_layer_masks, compare_logits, fixed_prompt_ids, summarize, torch_reference

PACKED_NAME = "semi_structured.safetensors"
DENSE_NAME = "dense.safetensors"
LAYOUT_NAME = "semi_structured.json"
BACKENDS = ("auto", "cutlass", "cusparselt", "dense")
PATTERN = NMPattern(2, 4)


class Not24Error(ConfigError):
    """A layer that is not exactly 2:4 (at most 2 nonzeros in every 4 consecutive input weights)."""


def check_24(w: torch.Tensor, name: str = "weight") -> None:
    if w.ndim != 2 or w.shape[1] % 4:
        raise Not24Error(f"{name} has shape {tuple(w.shape)}: 2:4 needs a 2-D weight whose input size is a "
                         "multiple of 4; export it with --format bitmask or onnx instead")
    nnz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
    bad = (nnz > 2).nonzero()
    if bad.numel():
        r, g = (int(x) for x in bad[0])
        raise Not24Error(
            f"{name} is not 2:4: {bad.shape[0]} groups of 4 hold more than 2 nonzeros (first: row {r}, columns "
            f"{4 * g}-{4 * g + 3} hold {int(nnz[r, g])}). Prune it with structure '2:4' (e.g. `sparse-runtime "
            "prune --structure 2:4`), or export it with --format bitmask or onnx")


def pack_24(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``W[R, C]`` (2:4) -> values ``R x C/2`` and meta uint8 ``R x ceil(C/8)``."""
    check_24(w, name)
    r, c = w.shape
    g = w.detach().reshape(r, c // 4, 4)
    keep = g != 0
    # order positions: nonzeros first, then zeros, each by column; the first two are stored
    key = (~keep).to(torch.int64) * 4 + torch.arange(4)
    idx = torch.sort(torch.argsort(key, dim=-1, stable=True)[..., :2], dim=-1).values
    values = torch.gather(g, -1, idx).reshape(r, c // 2).contiguous()
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [R, C/4]
    if nib.shape[1] % 2:
        nib = torch.cat([nib, nib.new_zeros(r, 1)], 1)
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
    return values, meta


def unpack_24(values: torch.Tensor, meta: torch.Tensor, shape) -> torch.Tensor:
    """Exact inverse of :func:`pack_24`."""
    r, c = (int(s) for s in shape)
    if values.shape != (r, c // 2) or meta.shape != (r, (c // 4 + 1) // 2):
        raise ModelLoadError(f"corrupt 2:4 tensor: values {tuple(values.shape)}, meta {tuple(meta.shape)} "
                             f"do not fit shape {(r, c)}")
    m = meta.to(torch.int64)
    nib = torch.stack([m & 0xF, m >> 4], -1).reshape(r, -1)[:, : c // 4]
    idx = torch.stack([nib & 3, (nib >> 2) & 3], -1)
    out = torch.zeros(r, c // 4, 4, dtype=values.dtype)
    out.scatter_(-1, idx, values.reshape(r, c // 4, 2))
    return out.reshape(r, c)


@dataclass
class SemiStructuredOptions(CommonOptions):
    """``dtype`` defaults to float16: the semi-structured CUDA kernels run 16-bit (and int8) values."""

    dtype: str = "float16"


@EXPORTERS.register("semi-structured")
class SemiStructuredExporter(Exporter):
    name = "semi-structured"
    Options = SemiStructuredOptions
    description = ("2:4 packed linears (values R x C/2 + 2-bit positions) for torch SparseSemiStructuredTensor "
                   "on CUDA; dense reconstruction on CPU")

    def write(self, src: Source, out: Path, opts: SemiStructuredOptions) -> dict[str, Any]:
        from safetensors.torch import save_file

        dt = _dtype(opts.dtype)
        packed, layers, packed_bytes, dense_equiv = {}, {}, 0, 0
        for name, lin in src.linears().items():
            w = lin.weight.detach()
            check_24(w, name)  # refuse before casting: the pattern of the source decides
            values, meta = pack_24(w.to(dt), name)
            packed[f"{name}.values"] = values
            packed[f"{name}.meta"] = meta
            packed[f"{name}.shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
            layers[name] = {"shape": list(w.shape), "sparsity": float((w == 0).sum()) / w.numel()}
            packed_bytes += values.numel() * values.element_size() + meta.numel()
            dense_equiv += w.numel() * values.element_size()
        skip = {f"{n}.weight" for n in layers}
        dense = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in dense_state_dict(src.model).items()
                 if k not in skip}
        save_file(packed, str(out / PACKED_NAME), metadata={"format": "pt", "sparse_format": "2:4-semi-structured"})
        save_file(dense, str(out / DENSE_NAME), metadata={"format": "pt"})
        src.copy_side_files(out)
        layout = {"format": "sparse-runtime/semi-structured-2:4", "version": 1, "dtype": opts.dtype,
                  "meta_encoding": "uint8, per group i0|i1<<2, even group low nibble", "layers": sorted(layers)}
        (out / LAYOUT_NAME).write_text(json.dumps(layout, indent=1))
        return {"dtype": opts.dtype, "packed_layers": len(layers), "layers": layers,
                "packed_bytes": packed_bytes, "dense_equivalent_bytes": dense_equiv,
                "packed_ratio": packed_bytes / max(1, dense_equiv)}

    def verify(self, src: Source, out: Path, opts: SemiStructuredOptions, contents: dict[str, Any]) -> dict[str, Any]:
        model, info = load_semi_structured(out, device="cpu")
        dt = _dtype(opts.dtype)
        exported = {n: lin.weight.detach() for n, lin in src.family.iter_linears(model)}
        exact = all(torch.equal(exported[n], lin.weight.detach().to(dt)) for n, lin in src.linears().items())
        masks = check_layer_masks(src.manifest, exported, opts.dtype)
        ids = fixed_prompt_ids(src.tokenizer, model.config.vocab_size)
        ref = torch_reference(src.model, ids, decode=False)
        with torch.no_grad():
            got = model(input_ids=ids).logits.float()
        rep = summarize([compare_logits("prefill", ref["prefill"], got, opts.dtype)], masks,
                        {"weights_bitwise_equal": exact, "loader": info})
        rep["ok"] = rep["ok"] and exact
        return rep

    def notes(self, opts) -> list[str]:
        return ["CPU loading rebuilds dense weights (no CPU kernel exploits 2:4)",
                "CUDA loading: torch.sparse.to_sparse_semi_structured (CUTLASS or cuSPARSELt); needs 16-bit or "
                "int8 values and an Ampere-or-newer GPU"]


def pick_backend(backend: str, device: str) -> str:
    backend = backend.lower()
    if backend not in BACKENDS:
        raise ConfigError(f"unknown 2:4 backend {backend!r}; choose one of {BACKENDS}")
    if not str(device).startswith("cuda"):
        if backend in ("cutlass", "cusparselt"):
            raise ConfigError(f"the {backend} backend needs a CUDA device; on CPU the 2:4 export loads as dense "
                              "weights (backend='dense' or 'auto')")
        return "dense"
    if backend == "auto":
        cslt = getattr(torch.backends, "cusparselt", None)
        return "cusparselt" if cslt is not None and cslt.is_available() else "cutlass"
    return backend


def load_semi_structured(path, device: str = "cpu", backend: str = "auto", dtype: Optional[str] = None):
    """Rebuild the model from a 2:4 export. Returns ``(model, info)``; ``info['backend']`` says which
    path ran (``dense`` on CPU, ``cutlass``/``cusparselt`` on CUDA) and how many weights became
    ``SparseSemiStructuredTensor``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparse_runtime.commands._common import check_device

    path = Path(path)
    check_device(str(device))  # "cuda" without CUDA: one clear line, not PyTorch's assertion
    if not (path / PACKED_NAME).is_file() or not (path / DENSE_NAME).is_file():
        raise ModelLoadError(f"{path} is not a semi-structured export ({PACKED_NAME} / {DENSE_NAME} missing)")
    chosen = pick_backend(backend, device)
    packed = load_file(str(path / PACKED_NAME))
    dense = load_file(str(path / DENSE_NAME))
    layers = sorted({k.rsplit(".", 1)[0] for k in packed})
    dt = _dtype(dtype) if dtype else packed[f"{layers[0]}.values"].dtype if layers else torch.float32
    for name in layers:
        w = unpack_24(packed[f"{name}.values"], packed[f"{name}.meta"], packed[f"{name}.shape"].tolist())
        dense[f"{name}.weight"] = w
    cfg = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dt, attn_implementation="eager")
    missing, unexpected = model.load_state_dict({k: v.to(dt) if v.is_floating_point() else v for k, v in dense.items()},
                                                strict=False)
    missing = [m for m in missing if not (m.endswith("lm_head.weight") and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model = model.to(device).eval()
    converted = 0
    if chosen in ("cutlass", "cusparselt"):
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        SparseSemiStructuredTensor._FORCE_CUTLASS = chosen == "cutlass"
        mods = dict(model.named_modules())
        for name in layers:
            lin = mods[name]
            try:
                lin.weight = torch.nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
            except Exception as e:  # shape/dtype constraints of the kernels
                raise ModelLoadError(f"{name}: cannot make a {chosen} SparseSemiStructuredTensor ({e}); "
                                     "use dtype float16/bfloat16 or backend='dense'") from e
            converted += 1
    return model, {"backend": chosen, "device": str(device), "packed_layers": len(layers),
                   "semi_structured_tensors": converted}
