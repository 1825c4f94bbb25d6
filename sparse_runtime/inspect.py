"""Sparsity inspection: per-layer and total sparsity of the block linears, and N:M compliance."""
from __future__ import annotations

from dataclasses import dataclass, field

from .sparsity import detect_nm


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
