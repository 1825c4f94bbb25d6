"""One-shot pruning on SmolLM2-135M: quality, measured sparsity, time and memory, dense in the same run.

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_pruning.py [--configs a,b,...] [--merge]

Configurations (``--configs``, default all): dense; magnitude 50 %, 2:4; Wanda 50/60/70 %, 2:4, 4:8;
SparseGPT 50/70 %, 2:4; OWL+Wanda 70 %; ATP+Wanda 70 % (beta chosen on held-out WikiText-2 valid).
``--merge`` keeps rows of other configurations from an earlier (split) run in the same result file.

Timing: "prune s" is the whole ``prune_model`` wall time (calibration windows are drawn once per run
and passed in, so it excludes tokenizing C4); "fwd s" is the block forwards inside the sequential
pass (the statistics pass on the dense block plus the re-run of the pruned block, hooks included);
"mask s" is the statistics/mask/weight-update work; "2x plain fwd" is twice one block-by-block
forward of the calibration set without hooks, measured once per run: the forward cost any
sequential one-shot method has to pay. "ratio" = prune s / 2x plain fwd (acceptance: <= 1.5).
Peak RSS is the process's high-water mark during the prune (reset before each configuration).

Saves benchmarks/results/<name>.{md,json} (default name pruning_<protocol>).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sparse_runtime as sr
from sparse_runtime.calibration import sequential_pass
from sparse_runtime.data.text import c4_windows
from sparse_runtime.prune import PruneConfig, prune_model
from sparse_runtime.report import save_results

CONFIGS: dict[str, dict] = {
    "dense": {},
    "magnitude-50": dict(method="magnitude", sparsity=0.5),
    "magnitude-2:4": dict(method="magnitude", structure="2:4"),
    "wanda-50": dict(method="wanda", sparsity=0.5),
    "wanda-60": dict(method="wanda", sparsity=0.6),
    "wanda-70": dict(method="wanda", sparsity=0.7),
    "wanda-2:4": dict(method="wanda", structure="2:4"),
    "wanda-4:8": dict(method="wanda", structure="4:8"),
    "sparsegpt-50": dict(method="sparsegpt", sparsity=0.5),
    "sparsegpt-70": dict(method="sparsegpt", sparsity=0.7),
    "sparsegpt-2:4": dict(method="sparsegpt", structure="2:4"),
    "owl-wanda-70": dict(method="wanda", sparsity=0.7, allocation="owl"),
    "atp-wanda-70": dict(method="wanda", sparsity=0.7, allocation="atp", atp_beta="auto"),
}
COLUMNS = ["config", "method", "structure", "allocation", "target", "measured", "ppl", "prune s", "fwd s", "mask s",
           "2x plain fwd s", "ratio", "peak RSS MiB", "detail"]


def _ppl(rows, name):
    r = next((r for r in rows if r["config"] == name), None)
    return None if r is None else r["ppl"]


def ordering_notes(rows) -> list[str]:
    """Checks of the papers' ordering, computed from the rows (never written by hand)."""
    notes = []
    checks = [("wanda-50", "<", "magnitude-50"), ("sparsegpt-50", "<", "magnitude-50"),
              ("wanda-2:4", "<", "magnitude-2:4"), ("sparsegpt-2:4", "<", "magnitude-2:4"),
              ("sparsegpt-70", "<", "wanda-70"), ("owl-wanda-70", "<", "wanda-70"), ("atp-wanda-70", "<", "wanda-70"),
              ("wanda-4:8", "<", "wanda-2:4")]
    for a, _, b in checks:
        pa, pb = _ppl(rows, a), _ppl(rows, b)
        if pa is None or pb is None:
            continue
        notes.append(f"ordering {a} < {b}: {'holds' if pa < pb else 'DOES NOT hold'} ({pa:.2f} vs {pb:.2f}, "
                     f"ratio {pb / pa:.2f}x)")
    ratios = [r["ratio"] for r in rows if isinstance(r.get("ratio"), (int, float)) and r["method"] != "magnitude"]
    if ratios:
        notes.append(f"prune wall / (2 x plain calibration forward): {min(ratios):.2f}..{max(ratios):.2f} over the "
                     f"calibrated configurations (acceptance <= 1.5)")
    return notes


def hessian_flop_note(lm) -> str:
    """Arithmetic from the model's shapes (not a timing): the FLOPs of SparseGPT's Hessian
    accumulation (one d_in x d_in product per shared input) against those of the block's linears."""
    block = lm.family.blocks(lm.model)[0]
    lins = lm.family.block_linears(block)
    grouped = {n for g in lm.family.shared_input_groups for n in g}
    inputs = [lins[g[0]].in_features for g in lm.family.shared_input_groups if g[0] in lins]
    inputs += [lin.in_features for n, lin in lins.items() if n not in grouped]
    hess = sum(d * d for d in inputs)
    fwd = sum(lin.in_features * lin.out_features for lin in lins.values())
    r = hess / fwd
    return (f"arithmetic (shapes, not timings): SparseGPT's Hessian sum of x x^T costs {r:.2f}x the FLOPs of the "
            "block's linears per token on this model (d_in^2 per shared input against d_in x d_out per linear), paid "
            f"once in the statistics pass, so SparseGPT's pass is about (2 + {r:.2f}) / 2 = {(2 + r) / 2:.2f}x two "
            "plain forwards before its OBS update (the 'mask s' column): the 1.5x bound is tight for it by "
            "construction")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=sr.DEFAULT_MODEL)
    ap.add_argument("--protocol", default="quick")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of: {', '.join(CONFIGS)}")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--merge", action="store_true", help="keep other configurations' rows from an earlier run")
    ap.add_argument("--paired-plain", action="store_true",
                    help="re-measure the plain forward right before each configuration (robust to drift on a "
                         "shared machine; costs one forward per configuration)")
    args = ap.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    out_name = args.name or f"pruning_{args.protocol}"
    t_run = time.perf_counter()
    proto = sr.get_protocol(args.protocol)
    lm = sr.load_model(args.model)
    calib = c4_windows(lm.tokenizer, proto.calib_samples, proto.calib_seqlen, proto.calib_seed, args.data_dir)
    # one plain block-by-block forward over the calibration set (no hooks, nothing pruned)
    plain = sequential_pass(lm.model, lm.family, calib, None, desc="plain forward").forward_s
    print(f"plain calibration forward: {plain:.1f} s ({proto.calib_samples} x {proto.calib_seqlen} tokens)", flush=True)
    rows = []
    for name in names:
        spec = CONFIGS[name]
        model = sr.load_model(args.model) if name != "dense" else lm
        t0 = time.perf_counter()
        row = {"config": name, "method": spec.get("method", "dense"), "structure": spec.get("structure", "unstructured"),
               "allocation": spec.get("allocation", "uniform") if spec else "-"}
        if name != "dense":
            if args.paired_plain:
                plain = sequential_pass(lm.model, lm.family, calib, None, desc="plain forward").forward_s
            cfg = PruneConfig(protocol=args.protocol, **spec)
            r = prune_model(model.model, model.tokenizer, cfg, family=model.family, data_dir=args.data_dir,
                            calib_ids=calib)
            t = r.timing
            detail = ""
            if "beta" in r.allocation_info:
                i = r.allocation_info
                detail = (f"beta={i['beta']:.5g} (max {i['beta_max']:.5g}); held-out ppl "
                          + ", ".join(f"{k}: {v:.2f}" for k, v in i["search"]["scores"].items()))
            elif "lod" in r.allocation_info:
                rates = list(r.block_rates.values())
                detail = f"M={cfg.owl_m}, lambda={cfg.owl_lambda}; block sparsity {min(rates):.3f}..{max(rates):.3f}"
            row |= {"target": round(r.sparsity_target, 4), "measured": round(r.sparsity_measured, 4),
                    "prune s": round(t["total_s"], 1), "fwd s": round(t["calibration_forward_s"], 1),
                    "mask s": round(t["stats_mask_s"], 1), "2x plain fwd s": round(2 * plain, 1),
                    "ratio": round(t["total_s"] / (2 * plain), 2) if r.allocation == "uniform" else None,
                    "peak RSS MiB": round(r.peak_rss_mb or 0), "detail": detail,
                    "allocation_s": round(t["allocation_s"], 1)}
        else:
            row |= {"target": 0.0, "measured": round(sum(float((l.weight == 0).sum()) for _, l in lm.family.iter_linears(lm.model))
                                                      / sum(l.weight.numel() for _, l in lm.family.iter_linears(lm.model)), 4)}
        p = sr.wikitext2_perplexity(model.model, model.tokenizer, args.protocol, args.data_dir)
        row["ppl"] = round(p.ppl, 3)
        rows.append(row)
        print(f"{name}: {row} (config wall {time.perf_counter() - t0:.0f} s)", flush=True)
        del model
    path = Path("benchmarks/results") / f"{out_name}.json"
    if args.merge and path.is_file():
        old = {r["config"]: r for r in json.loads(path.read_text()).get("rows", [])}
        old.update({r["config"]: r for r in rows})
        rows = [old[c] for c in CONFIGS if c in old]
    notes = [f"calibration: C4 {proto.calib_samples} x {proto.calib_seqlen} tokens, seed {proto.calib_seed}, drawn once "
             "and shared by every configuration; perplexity: WikiText-2 test, first "
             f"{proto.eval_windows} windows of {proto.eval_seqlen} tokens (docs/protocols.md)",
             "N:M = N zeros of every M inputs of a row (2:4 keeps 2 of 4; 4:8 prunes 4 of 8)",
             "ATP's beta is chosen by perplexity on the first 16 windows of WikiText-2 VALIDATION "
             "(tokens_pytorch_examples/valid.txt), never the test split; ratio is left empty for OWL/ATP "
             "(their allocation passes are extra by design: see allocation_s in the JSON)",
             "prune s = prune_model wall; fwd s = block forwards in the sequential pass (stats pass + re-run, hooks "
             "included); mask s = statistics/mask/weight-update work; ratio = prune pass / (2 x plain forward)",
             *ordering_notes(rows), hessian_flop_note(lm),
             f"this invocation: {', '.join(names)}; plain forward "
             f"{'re-measured right before each configuration' if args.paired_plain else 'measured once per run'}; "
             f"wall {time.perf_counter() - t_run:.0f} s"]
    save_results(out_name, f"One-shot pruning: {args.model}", rows, protocol=args.protocol, model=args.model,
                 notes=notes, columns=COLUMNS)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
