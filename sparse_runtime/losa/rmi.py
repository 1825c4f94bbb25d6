"""Representation mutual information (RMI) between layers, the layer-importance signal of LoSA.

The paper follows ITPruner / RMI-NAS (Zheng et al.): the mutual information between two layers'
representations is estimated by the normalised HSIC with a linear kernel,

    RMI(X_a, X_b) = ||X_b^T X_a||_F^2 / (||X_a^T X_a||_F ||X_b^T X_b||_F)

over centred features, i.e. linear CKA. Written with the n x n Gram matrices K = X X^T of the n
calibration samples (each flattened to one vector of seqlen * d), and H = I - 11^T/n,

    CKA(K_a, K_b) = <H K_a H, H K_b H>_F / (||H K_a H||_F ||H K_b H||_F)

which is exactly the official ``CKA/cka.py`` (``unbiased=False``). Only the Gram matrices are kept
(n x n per layer), never the features, so memory is bounded by the sequential driver's one block.

Importance (docs/methods.md#losa-round-loop step 4): m_l = sum_{b != l} C_lb, normalised to sum to 1 (how redundant
layer l is with the others), and I_l = exp(-beta m_l). The LP objective sum_l I_l x_l gives the
least redundant layers the lowest sparsity. Because the LP is linear with box constraints, only
the ORDER of I matters, and exp(-beta m) is monotone in m: beta (1 for Wanda, 100 for SparseGPT in
the code) changes nothing in the allocation; it is kept for the record.

Which features: ``"outputs"`` (default, our reading of the paper: each layer's representation is
what it produces) or ``"inputs"`` (the official code: each block's INPUT, so block 0's importance is
measured on the embeddings; docs/methods.md#losa-surprises item 3).
"""
from __future__ import annotations

from typing import Sequence

import torch

FEATURES = ("outputs", "inputs")


def gram(features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """K = X X^T (fp64) with X the samples flattened: [n, ...] or a list of [b, ...] mini-batches."""
    if isinstance(features, torch.Tensor):
        features = [features]
    X = torch.cat([f.detach().reshape(f.shape[0], -1).double() for f in features], 0)
    return X @ X.t()


def center(K: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/n."""
    K = K.double()
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def cka(Ka: torch.Tensor, Kb: torch.Tensor) -> float:
    """Linear CKA from two Gram matrices (biased HSIC, as the official code)."""
    A, B = center(Ka), center(Kb)
    den = float(A.norm() * B.norm())
    return float((A * B).sum()) / den if den > 0 else 0.0


def cka_matrix(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """C_ab = CKA(K_a, K_b) for all pairs (symmetric, ones on the diagonal where defined)."""
    cen = [center(K) for K in grams]
    norms = [float(c.norm()) for c in cen]
    L = len(cen)
    C = torch.zeros(L, L, dtype=torch.float64)
    for a in range(L):
        for b in range(a, L):
            den = norms[a] * norms[b]
            v = float((cen[a] * cen[b]).sum()) / den if den > 0 else 0.0
            C[a, b] = C[b, a] = v
    return C


def rmi_importance(C: torch.Tensor, beta: float = 1.0) -> tuple[list[float], list[float]]:
    """(importance I_l, redundancy m_l) from the similarity matrix ``C``."""
    C = C.double()
    L = C.shape[0]
    m = C.sum(1) - C.diagonal()
    tot = float(m.sum())
    m = m / tot if tot > 0 else torch.full((L,), 1.0 / max(1, L), dtype=torch.float64)
    imp = torch.exp(-float(beta) * m)
    return [float(v) for v in imp], [float(v) for v in m]


class GramCollector:
    """``on_block_end`` callback for :func:`~sparse_runtime.calibration.sequential_pass`: keeps the
    n x n Gram matrix of each block's inputs or outputs, and nothing else."""

    def __init__(self, features: str = "outputs") -> None:
        if features not in FEATURES:
            from ..errors import ConfigError

            raise ConfigError(f"rmi_features must be one of {FEATURES}, got {features!r}")
        self.features = features
        self.grams: dict[int, torch.Tensor] = {}

    def __call__(self, bi: int, block, inputs, outs) -> None:
        src = inputs.hidden if self.features == "inputs" else outs
        self.grams[bi] = gram(src).cpu()
