"""Figure of a LoSA run: per-block sparsity and LoRA rank, one line per round."""
from __future__ import annotations

import os
from pathlib import Path


def plot_rounds(result, path: os.PathLike, title: str = "LoSA per-round allocation") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9.0, 6.0), dpi=110, sharex=True)
    cmap = plt.get_cmap("viridis")
    n = max(1, len(result.rounds))
    for i, r in enumerate(result.rounds):
        c = cmap(i / max(1, n - 1))
        a1.plot(result.blocks, r.block_measured, marker="o", ms=3, color=c, label=f"t={r.round}: s_t={r.target:.3f}")
        a1.axhline(r.target, color=c, lw=0.6, ls=":")
        a2.step(result.blocks, r.ranks, where="mid", color=c, label=f"t={r.round} (total {sum(r.ranks)})")
    a1.set_ylabel("block sparsity (measured)")
    a2.set_ylabel("LoRA rank")
    a2.set_xlabel("block")
    a1.set_title(title)
    a1.legend(fontsize=7, ncol=2)
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
