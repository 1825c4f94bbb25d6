"""DSnoT on SmolLM2-135M: perplexity before/after and DSnoT's time beside pruning and one calibration forward.

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_dsnot.py [--pairs a,b,...] [--merge]

Pairs (``--pairs``, default all): Wanda 50 %, 60 %, 70 %, 2:4; magnitude 60 %; SparseGPT 70 %; ATP+Wanda 70 %.
The table is written after every pair; ``--merge`` keeps the rows of pairs this invocation does not
run, so a long run can be done (or resumed after an interruption) a few pairs at a time.
Each pair prunes the dense model twice on the SAME calibration windows: once plainly, once with DSnoT
fused into the same sequential pass (``prune_model(..., refiner=DSnoTRefiner(...))``), so the only
difference is DSnoT. ATP's beta is searched once (held-out WikiText-2 validation) for the plain run
and reused for the DSnoT run, so both have the same allocation.

Timing: "prune s" is the plain run's ``prune_model`` wall time; "dsnot s" is the time inside DSnoT's
refine calls in the fused run (its own cost); "1 calib fwd s" is one plain block-by-block forward
of the calibration set (no hooks), measured once at the start of the run; "same-pass fwd s" is half
the block-forward time of the fused pass (it runs two forwards per block), i.e. one calibration
forward measured under the same CPU load as DSnoT (the machine is shared). "dsnot/fwd" divides by
the smaller of the two. Acceptance: dsnot/fwd < 1, and ppl after <= ppl before.

Saves benchmarks/results/dsnot_<protocol>.{md,json}.
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
from sparse_runtime.protocols import custom_protocol
from sparse_runtime.prune import PruneConfig, prune_model
from sparse_runtime.repair.dsnot import DSnoTRefiner, make_config
from sparse_runtime.report import save_results

PAIRS: dict[str, dict] = {
    "wanda-50": dict(method="wanda", sparsity=0.5),
    "wanda-60": dict(method="wanda", sparsity=0.6),
    "wanda-70": dict(method="wanda", sparsity=0.7),
    "wanda-2:4": dict(method="wanda", structure="2:4"),
    "magnitude-60": dict(method="magnitude", sparsity=0.6),
    "sparsegpt-70": dict(method="sparsegpt", sparsity=0.7),
    "atp-wanda-70": dict(method="wanda", sparsity=0.7, allocation="atp", atp_beta="auto"),
}
COLUMNS = ["config", "ppl before", "ppl after", "gain", "prune s", "dsnot s", "1 calib fwd s", "same-pass fwd s",
           "dsnot/fwd",
           "swaps", "rows changed", "blocks reverted", "held-out check", "mean |e| before", "mean |e| after", "measured before", "measured after", "detail"]


def _measured(lm) -> float:
    lin = [l for _, l in lm.family.iter_linears(lm.model)]
    return sum(float((l.weight == 0).sum()) for l in lin) / sum(l.weight.numel() for l in lin)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=sr.DEFAULT_MODEL)
    ap.add_argument("--protocol", default="quick")
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"comma list of: {', '.join(PAIRS)}")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="DSnoT option (repeatable; default: the package defaults)")
    ap.add_argument("--atp-beta", default="auto", help="ATP beta for the plain run ('auto': held-out search)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--merge", action="store_true", help="keep other pairs' rows from an earlier run")
    ap.add_argument("--calib-seed", type=int, default=None,
                    help="draw the calibration windows with this seed instead of the protocol's (the spread across "
                         "seeds tells a real DSnoT effect from calibration noise)")
    args = ap.parse_args()
    import yaml

    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)}
    dcfg = make_config(options)
    names = [c.strip() for c in args.pairs.split(",") if c.strip()]
    unknown = [c for c in names if c not in PAIRS]
    if unknown:
        raise SystemExit(f"unknown pairs {unknown}; choose from {list(PAIRS)}")
    out_name = args.name or f"dsnot_{args.protocol}"
    t_run = time.perf_counter()
    proto = sr.get_protocol(args.protocol)
    lm = sr.load_model(args.model)
    dense_state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    if args.calib_seed is not None:
        proto = custom_protocol(args.protocol, calib_seed=args.calib_seed)
    calib = c4_windows(lm.tokenizer, proto.calib_samples, proto.calib_seqlen, proto.calib_seed, args.data_dir)
    plain = sequential_pass(lm.model, lm.family, calib, None, desc="plain forward").forward_s
    dense_ppl = sr.wikitext2_perplexity(lm.model, lm.tokenizer, args.protocol, args.data_dir).ppl
    print(f"dense ppl {dense_ppl:.3f}; one calibration forward: {plain:.1f} s "
          f"({proto.calib_samples} x {proto.calib_seqlen} tokens)", flush=True)
    rows = []
    for name in names:
        spec = dict(PAIRS[name])
        if spec.get("allocation") == "atp":
            spec["atp_beta"] = args.atp_beta
        t0 = time.perf_counter()
        lm.model.load_state_dict(dense_state)
        r0 = prune_model(lm.model, lm.tokenizer, PruneConfig(protocol=args.protocol, **spec), family=lm.family,
                         data_dir=args.data_dir, calib_ids=calib)
        before = sr.wikitext2_perplexity(lm.model, lm.tokenizer, args.protocol, args.data_dir).ppl
        m0 = _measured(lm)
        detail = ""
        if "beta" in r0.allocation_info:
            spec["atp_beta"] = float(r0.allocation_info["beta"])  # same allocation for the DSnoT run
            detail = f"ATP beta={spec['atp_beta']:.5g} (searched on held-out WikiText-2 valid, reused)"
        lm.model.load_state_dict(dense_state)
        ref = DSnoTRefiner(dcfg)
        r1 = prune_model(lm.model, lm.tokenizer, PruneConfig(protocol=args.protocol, **spec), family=lm.family,
                         data_dir=args.data_dir, calib_ids=calib, refiner=ref)
        after = sr.wikitext2_perplexity(lm.model, lm.tokenizer, args.protocol, args.data_dir).ppl
        s = ref.summary()
        # one calibration forward measured inside the fused pass itself (it runs two per block),
        # i.e. under the same CPU load as DSnoT's own time; the ratio uses the smaller of the two
        same = r1.timing["calibration_forward_s"] / 2
        row = {"config": name, "ppl before": round(before, 3), "ppl after": round(after, 3),
               "gain": round(before - after, 3), "prune s": round(r0.timing["total_s"], 1),
               "dsnot s": round(s["seconds"], 2), "1 calib fwd s": round(plain, 1),
               "same-pass fwd s": round(same, 1), "dsnot/fwd": round(s["seconds"] / min(plain, same), 3),
               "swaps": s["swaps"],
               "rows changed": f"{s['rows_changed']}/{s['rows']}",
               "blocks reverted": (f"{len(s['blocks_reverted'])}/{s['blocks_guarded']}"
                                   + (f" ({', '.join(map(str, s['blocks_reverted']))})" if s["blocks_reverted"] else "")
                                   if s["guard"] != "none" else "off"),
               "held-out check": _heldout_cell(s),
               "mean |e| before": float(f"{s['mean_abs_error_before']:.4g}"),
               "mean |e| after": float(f"{s['mean_abs_error_after']:.4g}"),
               "measured before": round(m0, 4), "measured after": round(_measured(lm), 4),
               "fused prune s": round(r1.timing["total_s"], 1), "detail": detail}
        rows.append(row)
        print(f"{name}: {row} (pair wall {time.perf_counter() - t0:.0f} s)", flush=True)
        _save(args, out_name, proto, names, rows, dense_ppl, dcfg, t_run)


def _heldout_cell(s: dict) -> str:
    """accept=heldout's decision: which model it kept and the two held-out perplexities."""
    h = s.get("heldout")
    if s.get("accept", "always") == "always" or not h:
        return "off"
    if h.get("ppl_dsnot") is None:
        return "no swaps"
    verdict = "kept DSnoT" if h["kept"] else "kept pruner"
    return f"{verdict} ({h['set']} {h['windows']}x{h['seqlen']}: dsnot {h['ppl_dsnot']:.3f}, pruner {h['ppl_pruner']:.3f})"


def _save(args, out_name, proto, names, rows, dense_ppl, dcfg, t_run) -> None:
    """Write the table (called after every pair, so a long run leaves its finished rows behind)."""
    path = Path("benchmarks/results") / f"{out_name}.json"
    if args.merge and path.is_file():
        old = {r["config"]: r for r in json.loads(path.read_text()).get("rows", [])}
        old.update({r["config"]: r for r in rows})
        rows = [old[c] for c in PAIRS if c in old]
    worse = [r["config"] for r in rows if r["ppl after"] > r["ppl before"]]
    slow = [r["config"] for r in rows if r["dsnot/fwd"] >= 1]
    notes = [f"dense ppl {dense_ppl:.3f} (same run)",
             f"calibration: C4 {proto.calib_samples} x {proto.calib_seqlen} tokens, seed {proto.calib_seed}, drawn once and "
             f"shared by every run; perplexity: WikiText-2 test, first {proto.eval_windows} windows of {proto.eval_seqlen} "
             "tokens (docs/protocols.md)",
             f"DSnoT options: {dcfg.as_dict()} (fused into the pruning pass)",
             "mean |e| = mean over refined rows of the expected output error |e_r| = |sum_pruned W_rj E[x_j]| (per token), "
             "before and after DSnoT; rows changed = rows with at least one accepted swap",
             "N:M = N zeros of every M inputs of a row (2:4 keeps 2 of 4)",
             "blocks reverted = blocks where the block guard kept the pruner's masks because DSnoT did not lower the "
             "block's output error against the dense block (of the blocks DSnoT changed; block indices in brackets; "
             "docs/dsnot.md#the-block-guard); swaps and rows changed count only the swaps kept; dsnot s includes the guard; "
             "off = guard=none (the default); a row with this column empty was kept by --merge from a run before "
             "the guard option existed (unguarded DSnoT)",
             "held-out check = accept=heldout's or accept=compare's decision (docs/dsnot.md#held-out-acceptance): "
             "the whole model's perplexity on held-out windows (never WikiText-2 test) with DSnoT's weights and "
             "with the pruner's (compare: the pruner's own pass, run first); DSnoT is kept only if lower (its time "
             "is in dsnot s; compare's extra pass is in fused prune s); off = accept=always",
             f"DSnoT never worse: {'yes' if not worse else 'NO: ' + ', '.join(worse)}; "
             f"DSnoT below one calibration forward: {'yes' if not slow else 'NO: ' + ', '.join(slow)}",
             f"this invocation: {', '.join(names)}; wall {time.perf_counter() - t_run:.0f} s"]
    save_results(out_name, f"DSnoT (fused with pruning): {args.model}", rows, protocol=args.protocol, model=args.model,
                 notes=notes, columns=COLUMNS)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
