"""Figures for run reports. matplotlib with the Agg backend (no display), imported only when used."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def plot_layer_sparsity(targets: Mapping[str, float], measured: Mapping[str, float], path: os.PathLike,
                        title: str = "per-layer sparsity") -> Path:
    """One point per pruned linear, in model order, coloured by its block-relative name (q, k, v, o,
    gate, up, down), with the allocated target as a step line: shows OWL/ATP's per-block schedule
    and that the measured sparsity sits on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(targets)
    kinds = [n.rsplit(".", 1)[-1] for n in names]
    order = list(dict.fromkeys(kinds))
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(8.0, min(18.0, len(names) * 0.06 + 4)), 4.0), dpi=110)
    x = list(range(len(names)))
    ax.step(x, [targets[n] for n in names], where="mid", color="black", lw=1.0, label="target")
    for ki, kind in enumerate(order):
        xs = [i for i, k in enumerate(kinds) if k == kind]
        ax.scatter(xs, [measured.get(names[i], float("nan")) for i in xs], s=10, color=cmap(ki % 10), label=kind)
    blocks = [n.split(".") for n in names]
    ticks, labels, last = [], [], None
    for i, parts in enumerate(blocks):
        b = next((p for p in parts if p.isdigit()), None)
        if b != last:
            ticks.append(i)
            labels.append(b)
            last = b
    step = max(1, len(ticks) // 16)
    ax.set_xticks(ticks[::step], labels[::step])
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity (fraction of zeros)")
    lo = min(min(targets.values()), min(measured.values()))
    hi = max(max(targets.values()), max(measured.values()))
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, hi + 0.05))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=min(8, len(order) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
