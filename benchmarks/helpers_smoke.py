"""Tiny random checkpoints for ``bench_serve.py --smoke`` (dense, 70 % and 2:4 by magnitude): the
script's plumbing is checked in seconds; nothing measured on them is a result."""
from __future__ import annotations

from pathlib import Path


def tiny_checkpoints(work: Path, sr) -> dict[str, str]:
    import torch

    from sparse_runtime.sparsity import NMPattern, nm_prune_mask, topk_prune_mask

    out = {}
    for label in ("dense", "wanda-70", "wanda-2:4"):
        d = Path(work) / f"tiny-{label.replace(':', '')}"
        if not (d / "config.json").is_file():
            lm = sr.load_model("tiny-llama")
            with torch.no_grad():
                for _, lin in lm.family.iter_linears(lm.model):
                    if label == "wanda-70":
                        lin.weight.mul_(topk_prune_mask(lin.weight.abs(), 0.7, per_row=True))
                    elif label == "wanda-2:4":
                        lin.weight.mul_(nm_prune_mask(lin.weight.abs(), NMPattern(2, 4)))
            sr.save_checkpoint(lm.model, lm.tokenizer, d, sr.build_manifest(lm.model, lm.family, base_model="tiny-llama"))
        out[label] = str(d)
    return out
