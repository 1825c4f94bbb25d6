"""The LoSA view of the ``ft-quick`` table: LoSA (RMI and ATP allocation) at 50 % and 70 % beside
Wanda alone, Wanda + masked LoRA and Wanda + LoRS at the same budget, with LoSA's per-phase wall
times and peak memory, and the per-round layer sparsity and rank allocations as plots.

    python benchmarks/report_losa.py            # reads benchmarks/results/ft_quick.json

It measures nothing: every figure comes from the rows ``bench_ft_quick.py`` saved (the header names
the machine and date of that run). Writes ``benchmarks/results/losa_ft_quick.{md,json}`` and
``losa_allocation_<config>.png`` per LoSA configuration.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ["dense_reference_s", "rmi_s", "allocation_s", "prune_s", "rank_s", "finetune_s", "verify_s", "merge_s"]
PHASE_NAMES = {"dense_reference_s": "dense ref s", "rmi_s": "rmi s", "allocation_s": "allocation s",
               "prune_s": "prune s", "rank_s": "rank s", "finetune_s": "finetune s", "verify_s": "verify s",
               "merge_s": "merge s"}
COLUMNS = ["sparsity", "config", "ppl before", "ppl after merge", "sparsity after", "peak train CUDA MB",
           "step s (median)", "total s", "finetune s", "prune s", "rmi s", "allocation s", "rank s", "verify s",
           "dense ref s", "merge s", "rounds: target -> ranks total"]
BESIDE = ["wanda-only@wanda-{p}", "masked-lora@wanda-{p}", "lors@wanda-{p}", "seft@wanda-{p}", "losa@{p}",
          "losa-atp@{p}"]


def _row(r: dict[str, Any], pct: int) -> dict[str, Any]:
    det = r.get("detail") or {}
    out: dict[str, Any] = {"sparsity": f"{pct} %", "config": r["config"], "ppl before": r["ppl before"],
                           "ppl after merge": r["ppl after merge"], "sparsity after": r["sparsity after"],
                           "peak train CUDA MB": r.get("peak train CUDA MB"),
                           "step s (median)": r.get("step s (median)")}
    if r["config"].startswith("losa"):
        t = det.get("timing") or {}
        out.update({PHASE_NAMES[k]: round(t[k], 1) for k in PHASES if k in t})
        out["total s"] = round(t.get("total_s", 0.0), 1)
        recs = det.get("round_records") or []
        out["rounds: target -> ranks total"] = "; ".join(f"{rr['target']:.3f} -> {sum(rr['ranks'])}" for rr in recs)
    elif r["config"].startswith("wanda-only"):
        base = (det.get("base") or {})
        out["prune s"] = round(base.get("prune_s", 0.0), 1)
        out["total s"] = out["prune s"]
    else:
        out["finetune s"] = round(r.get("train s") or 0.0, 1)
        out["merge s"] = round(det.get("merge_s") or 0.0, 1)
        out["total s"] = round(r.get("wall s") or 0.0, 1)
    return out


def plot(row: dict[str, Any], out_dir: Path) -> Optional[Path]:
    from sparse_runtime.losa.plot import plot_rounds

    det = row.get("detail") or {}
    recs, blocks = det.get("round_records"), det.get("blocks")
    if not recs or not blocks or "block_measured" not in recs[0]:
        return None
    res = SimpleNamespace(blocks=blocks, rounds=[SimpleNamespace(**rr) for rr in recs])
    alloc = (det.get("config") or {}).get("allocation", "?")
    name = row["config"].replace("@", "_")
    return plot_rounds(res, out_dir / f"losa_allocation_{name}.png",
                       title=f"LoSA {row['config']} ({alloc} allocation): block sparsity and LoRA rank per round")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=str(ROOT / "benchmarks" / "results" / "ft_quick.json"))
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    from sparse_runtime.report import save_results

    src = json.loads(Path(args.source).read_text())
    by = {r["config"]: r for r in src["rows"] if r.get("budget") in ("ft-quick", "-")}
    rows, plots, missing = [], [], []
    for pct in (50, 70):
        for pat in BESIDE:
            name = pat.format(p=pct)
            if name in by:
                rows.append(_row(by[name], pct))
            else:
                missing.append(name)
            if name.startswith("losa") and name in by:
                p = plot(by[name], Path(args.out_dir))
                if p:
                    plots.append(p.name)
    dates = sorted(r.get("date", "") for r in src["rows"])
    losa_row = next((by[n] for n in ("losa@70", "losa@50") if n in by), None)
    cfg = ((losa_row or {}).get("detail") or {}).get("config") or {}
    notes = [
        f"derived from {Path(args.source).name} (bench_ft_quick.py; no new measurement): the same ft-quick budget "
        "(200 x 8 x 512 tokens in total, rank 8 or its equivalent), quick calibration and quick perplexity",
        f"LoSA: T = {cfg.get('rounds', 5)}, cubic schedule, from the DENSE model, the budget split evenly over the "
        f"rounds, {cfg.get('prune_method', 'wanda')} re-prune; losa = RMI + LP allocation, losa-atp = ATP allocation "
        "at every round; ppl before = the dense model",
        "Wanda + masked LoRA / LoRS / SEFT start from the one-shot Wanda base at the same sparsity (ppl before = that "
        "base); their wall time is training + merge (+ two perplexities in 'total s')",
        "per-phase wall (LoSA, seconds, whole run): dense reference outputs, RMI (Gram) passes, LP allocation, "
        "re-prune passes (with reconstruction errors), rank allocation and adapter resizing, fine-tuning, per-round "
        "verification, final merge",
        "peak train CUDA MB: LoSA = the largest training-loop peak over its rounds; the others = their one loop",
        "machine load: up to 8 configurations shared the GPU (see ft_quick.md): walls and step times are under "
        "that sharing; perplexities and CUDA peaks are per process",
        "plots: " + (", ".join(plots) or "none") + " (per round: measured block sparsity with s_t dotted, and the "
        "per-block LoRA ranks)",
    ]
    if missing:
        notes.append("missing rows (not in the source table): " + ", ".join(missing))
    measured = {"machine": src.get("machine"), "versions": src.get("versions"), "date": dates[-1] if dates else None}
    save_results("losa_ft_quick", "LoSA at the ft-quick budget beside one-shot Wanda + fine-tuning: SmolLM2-135M",
                 rows, protocol="ft-quick fine-tuning + quick perplexity (derived from ft_quick.json)",
                 model=src.get("model", ""), notes=notes, columns=COLUMNS, out_dir=args.out_dir, measured=measured,
                 extra={"source": Path(args.source).name, "plots": plots})


if __name__ == "__main__":
    main()
