"""Sparsity structures and the mask utilities every stage shares.

Wording, made explicit once for the whole package
-------------------------------------------------
``N:M`` follows the pruning papers (Wanda, SparseGPT, DSnoT): **N zeros in every group of M
consecutive input columns of each row** ("prune N of M"). So ``2:4`` keeps 2 of 4 (NVIDIA's 2:4
too) and ``4:8`` prunes 4 of 8 (50 %). ``NMPattern.kept`` gives the other reading (M - N nonzeros).
A group may hold *more* zeros than N (a weight that was already zero); compliance means at most
``M - N`` nonzeros per group.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class NMPattern:
    """N zeros in every M consecutive weights of a row (the papers' "prune N of M")."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 2 or not 0 < self.n < self.m:
            raise ConfigError(
                f"invalid N:M pattern {self.n}:{self.m}: need 0 < N < M (N zeros of every M), e.g. 2:4 or 4:8"
            )

    @property
    def kept(self) -> int:
        return self.m - self.n

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def parse(cls, text: str) -> "NMPattern":
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not m:
            raise ConfigError(f"cannot read N:M pattern {text!r}; write it as 'N:M', e.g. '2:4' (2 zeros of 4)")
        return cls(int(m.group(1)), int(m.group(2)))

    def check_divides(self, in_features: int, name: str = "layer") -> None:
        if in_features % self.m:
            raise ConfigError(
                f"N:M {self} needs the input size to be a multiple of M={self.m}, but {name} has "
                f"{in_features} input features; exclude that layer or choose another M"
            )


Structure = Optional[NMPattern]  # None means unstructured


def parse_structure(text: Union[str, NMPattern, None]) -> Structure:
    """``None``/'unstructured' -> None; '2:4' -> NMPattern(2, 4)."""
    if text is None or isinstance(text, NMPattern):
        return text
    if str(text).strip().lower() in ("", "unstructured", "none"):
        return None
    return NMPattern.parse(str(text))


def structure_name(structure: Structure) -> str:
    return "unstructured" if structure is None else str(structure)


def check_sparsity(s: float, what: str = "sparsity") -> float:
    try:
        s = float(s)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number in [0, 1), got {s!r}") from None
    if not 0.0 <= s < 1.0:
        raise ConfigError(f"{what} must be in [0, 1) (the fraction of weights set to zero), got {s}")
    return s


def sparsity_of(w: torch.Tensor) -> float:
    return float((w == 0).sum().item()) / max(1, w.numel())


def nm_compliant(w: torch.Tensor, pattern: NMPattern) -> bool:
    """True when every group of M consecutive input weights of every row has <= M - N nonzeros."""
    rows, cols = w.shape
    if cols % pattern.m:
        return False
    nnz = (w.reshape(rows, cols // pattern.m, pattern.m) != 0).sum(-1)
    return bool((nnz <= pattern.kept).all())


def detect_nm(w: torch.Tensor, candidates: tuple[str, ...] = ("2:4", "4:8")) -> list[str]:
    return [c for c in candidates if nm_compliant(w, NMPattern.parse(c))]


def mask_digest(mask: torch.Tensor) -> str:
    """SHA-256 of the packed boolean mask (True = kept), shape included: a fingerprint of the pattern."""
    m = mask.detach().to("cpu", torch.bool).contiguous()
    h = hashlib.sha256(str(tuple(m.shape)).encode())
    flat = m.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    packed = (flat.reshape(-1, 8).to(torch.uint8) * weights).sum(-1).to(torch.uint8)
    h.update(packed.numpy().tobytes())
    return h.hexdigest()


def topk_prune_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Boolean keep-mask that zeros the floor(k * sparsity) smallest scores.

    per_row=True zeros floor(C_in * s) per output row (Wanda's comparison group); False zeros
    floor(numel * s) over the whole matrix (magnitude's per-matrix threshold). Ties are broken by a
    stable sort so the count is exact.
    """
    if per_row:
        k = int(score.shape[1] * sparsity)
        return _keep_above_kth(score, k) if k else torch.ones_like(score, dtype=torch.bool)
    k = int(score.numel() * sparsity)
    if not k:
        return torch.ones_like(score, dtype=torch.bool)
    return _keep_above_kth(score.reshape(1, -1), k).view(score.shape)


def _keep_above_kth(score: torch.Tensor, k: int) -> torch.Tensor:
    """Per row: False at the k smallest scores, ties broken by position (what a stable ascending
    sort's first k indices give), True elsewhere. Selection instead of a sort: the k-th smallest
    value per row, everything below it, and the first few equal to it in index order; 3-4x faster
    than the stable sort on 7B-sized rows and exactly the same mask (tested against the sort)."""
    if torch.isnan(score).any():  # a sort orders NaN last; keep that rule for the rare bad input
        keep = torch.ones_like(score, dtype=torch.bool)
        keep.scatter_(1, torch.sort(score, dim=1, stable=True)[1][:, :k], False)
        return keep
    thr = torch.kthvalue(score, k, dim=1, keepdim=True).values
    below = score < thr
    tied = score == thr
    need = k - below.sum(1, keepdim=True)
    return ~(below | (tied & (tied.cumsum(1) <= need)))


def nm_prune_mask(score: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep-mask zeroing the N smallest scores in every M-group of every row."""
    rows, cols = score.shape
    pattern.check_divides(cols)
    g = score.reshape(rows, cols // pattern.m, pattern.m)
    idx = torch.topk(g, pattern.n, dim=-1, largest=False)[1]
    keep = torch.ones_like(g, dtype=torch.bool)
    keep.scatter_(-1, idx, False)
    return keep.reshape(rows, cols)
