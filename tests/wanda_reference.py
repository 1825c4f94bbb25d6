"""A second, plain pruner for the exporters' tests and the export benchmarks (not shipped).

The exporters' tests must not depend on the project's pruning code (``sparse_runtime.pruning``):
a bug there would then hide in both the model under test and the reference. So they make their
pruned models here, independently, with the two simplest published criteria:

- magnitude: score ``|W_ij|``;
- Wanda (Sun et al. 2023, Eq. 1): score ``|W_ij| * ||X_j||_2`` over calibration activations, with
  per-output-row comparison groups (the paper's choice) for unstructured sparsity.
N:M uses :func:`sparse_runtime.sparsity.nm_prune_mask` on the same scores.
"""
from __future__ import annotations

from typing import Optional

import torch

from sparse_runtime.sparsity import NMPattern, nm_prune_mask, parse_structure, topk_prune_mask


@torch.no_grad()
def activation_norms(model, family, calib_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """||X_j||_2 per input column of every prunable linear (one forward pass with hooks)."""
    sq: dict[str, torch.Tensor] = {}
    hooks = []
    for name, lin in family.iter_linears(model):
        def hook(mod, inp, _out, name=name):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            sq[name] = sq.get(name, 0) + (x * x).sum(0)
        hooks.append(lin.register_forward_hook(hook))
    try:
        model(input_ids=calib_ids)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.sqrt() for k, v in sq.items()}


@torch.no_grad()
def prune_model(model, family, sparsity: float = 0.5, structure: Optional[str] = None, method: str = "magnitude",
                calib_ids: Optional[torch.Tensor] = None) -> dict[str, str]:
    """Prune every block linear in place; return {layer: structure name} for the manifest.

    The scores use the unpruned model's activations (one-shot, not sequential)."""
    pattern = parse_structure(structure)
    norms = activation_norms(model, family, calib_ids) if method == "wanda" else {}
    structures = {}
    for name, lin in family.iter_linears(model):
        w = lin.weight
        score = w.abs().float()
        if method == "wanda":
            score = score * norms[name].to(score.dtype)[None, :]
        if isinstance(pattern, NMPattern):
            keep = nm_prune_mask(score, pattern)
        else:
            keep = topk_prune_mask(score, sparsity, per_row=(method == "wanda"))
        w.mul_(keep.to(w.dtype))
        structures[name] = str(pattern) if pattern else "unstructured"
    return structures


def make_checkpoint(out, family_name: str = "llama", sparsity: float = 0.5, structure: Optional[str] = None,
                    seed: int = 0, overwrite: bool = True):
    """A pruned tiny model saved as a sparse-runtime checkpoint (HF dir + sparsity manifest)."""
    from sparse_runtime.manifest import build_manifest, save_checkpoint
    from sparse_runtime.models import ByteTokenizer, family_of, tiny_model

    model = tiny_model(family_name, seed)
    fam = family_of(model)
    structures = prune_model(model, fam, sparsity, structure)
    target = 0.5 if structure else sparsity
    man = build_manifest(model, fam, targets={n: target for n in structures}, structures=structures,
                         base_model=f"tiny-{family_name}", step={"stage": "test-prune", "method": "magnitude"})
    return save_checkpoint(model, ByteTokenizer(), out, man, overwrite=overwrite)
