"""Cost growth of streamed pruning (issue 17): one table and one plot from the capped runs.

    python benchmarks/report_scale_growth.py [--out-dir benchmarks/results]

Reads ``scale_growth.json`` (135M, 1B, 7B: ``benchmarks/plans/scale_growth.yaml``) and ``scale_13b.json``
(``benchmarks/plans/scale_13b.yaml``), both Wanda 50 % streamed under the ``scale`` protocol with bf16
storage, and writes ``scale_growth_table.md|json`` and ``scale_growth.png``: prune wall time and peak
anonymous memory against parameters and depth. Nothing is measured here; every figure comes from those
runs' JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# step name -> (model, parameters in billions, blocks); parameters from sparse-runtime synth --list
MODELS = {"prune-135m": ("SmolLM2-135M", 0.135, 30), "prune-1b": ("Llama-3.2-1B", 1.236, 16),
          "prune-7b": ("LLaMA-2-7B", 6.738, 32), "prune-wanda50-13b": ("LLaMA-2-13B", 13.016, 40)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    steps = {}
    for name in ("scale_growth", "scale_13b"):
        data = json.loads((out / f"{name}.json").read_text())
        for s in data.get("extra", data).get("steps", []):
            steps[s["name"]] = s
    rows = []
    for step, (model, params, blocks) in MODELS.items():
        s = steps.get(step)
        if s is None or not s.get("ok"):
            continue
        rows.append({"model": model, "parameters B": params, "blocks": blocks, "wall s": round(s["wall_s"], 1),
                     "s per B params": round(s["wall_s"] / params, 1),
                     "peak anon MiB": round(s["peak_anon_bytes"] / 2**20), "cap MiB": round(s["cap_bytes"] / 2**20)})
    from sparse_runtime.report import save_results

    save_results("scale_growth_table", "Cost growth of streamed pruning (Wanda 50 %, protocol scale)", rows,
                 protocol="scale", model="synthetic (random bf16 weights)", out_dir=out,
                 notes=["from scale_growth.json and scale_13b.json (each step in its own memory cgroup)",
                        "peak anon = the cgroup's anonymous memory: what the step holds"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
        p = [r["parameters B"] for r in rows]
        ax1.plot(p, [r["wall s"] for r in rows], "o-")
        ax1.set_xlabel("parameters (B)"), ax1.set_ylabel("prune wall time (s)"), ax1.set_title("time")
        ax2.plot(p, [r["peak anon MiB"] / 1024 for r in rows], "o-")
        ax2.set_xlabel("parameters (B)"), ax2.set_ylabel("peak anon (GiB)"), ax2.set_title("memory (8 GiB cap)")
        ax2.set_ylim(0, 8)
        fig.tight_layout()
        fig.savefig(out / "scale_growth.png", dpi=110)
    except ImportError:  # pragma: no cover
        pass
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
