"""Small builders shared by several test modules (pytest puts this folder on ``sys.path``)."""
from __future__ import annotations

from pathlib import Path

import torch

import sparse_runtime as sr
from sparse_runtime.sparsity import NMPattern, nm_prune_mask, topk_prune_mask


def tiny_pruned(family: str = "llama", structure: str = "unstructured", sparsity: float = 0.5,
                with_targets: bool = False):
    """A tiny random model of ``family`` pruned by magnitude (per row, or 2:4), and its manifest.

    Magnitude keeps the fixture cheap and deterministic; the tests that use it check invariants
    (sparsity, pattern, logits), not pruning quality."""
    lm = sr.load_model(f"tiny-{family}")
    structures, targets = {}, {}
    with torch.no_grad():
        for n, lin in lm.family.iter_linears(lm.model):
            if structure == "2:4":
                keep = nm_prune_mask(lin.weight.abs(), NMPattern(2, 4))
                structures[n] = "2:4"
            else:
                keep = topk_prune_mask(lin.weight.abs(), sparsity, per_row=True)
            targets[n] = sparsity
            lin.weight.mul_(keep)
    man = sr.build_manifest(lm.model, lm.family, structures=structures, targets=targets if with_targets else None,
                            base_model=f"tiny-{family}")
    return lm, man


def save_tiny_pruned(path: Path, family: str = "llama", structure: str = "unstructured", sparsity: float = 0.5,
                     with_targets: bool = False, manifest: bool = True) -> Path:
    """:func:`tiny_pruned` written as a checkpoint at ``path`` (optionally without its manifest)."""
    lm, man = tiny_pruned(family, structure, sparsity, with_targets)
    sr.save_checkpoint(lm.model, lm.tokenizer, path, man)
    if not manifest:
        (Path(path) / "sparsity_manifest.json").unlink()
    return Path(path)
