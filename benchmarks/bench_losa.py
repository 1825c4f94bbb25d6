"""LoSA on SmolLM2-135M beside the dense model and one-shot Wanda, same calibration windows.

Default: a SMOKE-SCALE run (T = 3, 5 steps x 4 x 256 tokens per round, 16 calibration windows),
NOT the issue's comparison (LoSA T = 5 at the ft-quick budget beside Wanda + masked LoRA / LoRS at
50 % and 70 %, ~1 h per configuration). Reports `quick` perplexity, per-phase wall time (RMI,
allocation, pruning, fine-tuning), peak memory and a plot of the per-round sparsity/rank allocations.

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_losa.py
    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_losa.py --sparsity 0.7 --rounds 5 \
        --steps 200 --batch-size 8 --seq-len 512 --calib-samples 32 --name losa_ftquick_70
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15, help="total optimiser steps over all rounds")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--allocation", default="rmi")
    ap.add_argument("--protocol", default="quick")
    ap.add_argument("--name", default="losa_small")
    ap.add_argument("--no-wanda", action="store_true")
    args = ap.parse_args()

    import sparse_runtime as sr
    from sparse_runtime.data.text import c4_windows
    from sparse_runtime.eval.perplexity import wikitext2_perplexity
    from sparse_runtime.losa import LoSAConfig, run_losa_model
    from sparse_runtime.losa.plot import plot_rounds
    from sparse_runtime.protocols import get_protocol
    from sparse_runtime.report import save_results

    torch.manual_seed(0)
    proto = get_protocol(args.protocol)
    rows = []
    lm = sr.load_model(args.model)
    calib = c4_windows(lm.tokenizer, args.calib_samples, proto.calib_seqlen, proto.calib_seed, None)
    t0 = time.perf_counter()
    dense = wikitext2_perplexity(lm.model, lm.tokenizer, args.protocol)
    rows.append({"config": "dense", "sparsity": 0.0, "ppl": round(dense.ppl, 3), "total_s": round(time.perf_counter() - t0, 1)})

    if not args.no_wanda:
        from sparse_runtime.prune import PruneConfig, prune_model

        lm_w = sr.load_model(args.model)
        t0 = time.perf_counter()
        pr = prune_model(lm_w.model, lm_w.tokenizer, PruneConfig(method="wanda", sparsity=args.sparsity), calib_ids=calib)
        prune_s = time.perf_counter() - t0
        ppl = wikitext2_perplexity(lm_w.model, lm_w.tokenizer, args.protocol).ppl
        rows.append({"config": f"wanda one-shot {args.sparsity:.0%} (uniform)", "sparsity": round(pr.sparsity_measured, 4),
                     "ppl": round(ppl, 3), "prune_s": round(prune_s, 1), "total_s": round(prune_s, 1)})
        del lm_w

    cfg = LoSAConfig(sparsity=args.sparsity, rounds=args.rounds, steps=args.steps, train_batch_size=args.batch_size,
                     seq_len=args.seq_len, nsamples=args.calib_samples, protocol=args.protocol, data="c4",
                     allocation=args.allocation)
    res = run_losa_model(lm, cfg, calib_ids=calib)
    ppl = wikitext2_perplexity(lm.model, lm.tokenizer, args.protocol).ppl
    t = res.timing
    rows.append({"config": f"LoSA T={args.rounds} {args.allocation}+wanda {args.sparsity:.0%}, "
                           f"{args.steps} steps x {args.batch_size} x {args.seq_len} tok",
                 "sparsity": round(res.sparsity_measured, 4), "ppl": round(ppl, 3),
                 "dense_ref_s": round(t["dense_reference_s"], 1), "rmi_s": round(t["rmi_s"], 1),
                 "allocation_s": round(t["allocation_s"] + t["rank_s"], 2), "prune_s": round(t["prune_s"], 1),
                 "finetune_s": round(t["finetune_s"], 1), "total_s": round(t["total_s"], 1),
                 "peak_rss_mb": round(res.peak_rss_mb)})
    for r in res.rounds:
        rows.append({"config": f"  round {r.round}: s_t={r.target:.4f}", "sparsity": round(r.measured_mean, 4),
                     "ranks": f"{min(r.ranks)}..{max(r.ranks)} (total {sum(r.ranks)})",
                     "rmi_s": round(r.timing.get("rmi_s", 0), 1), "prune_s": round(r.timing.get("prune_s", 0), 1),
                     "finetune_s": round(r.timing.get("finetune_s", 0), 1),
                     "loss": None if r.final_loss is None else round(r.final_loss, 3)})
    out_dir = Path("benchmarks/results")
    plot = plot_rounds(res, out_dir / f"{args.name}.png",
                       title=f"LoSA {args.model} {args.sparsity:.0%} T={args.rounds}: per-block sparsity and rank")
    notes = [
        "SMOKE-SCALE RUN, NOT THE ISSUE'S COMPARISON: tiny fine-tuning budget "
        f"({args.steps} steps x {args.batch_size} x {args.seq_len} tokens in total, split over {args.rounds} rounds) and "
        f"{args.calib_samples} calibration windows of {proto.calib_seqlen}; the ft-quick table (LoSA T=5 vs Wanda + "
        "masked LoRA / LoRS at 50 % and 70 %, ~1 h per configuration) was not run in this session.",
        "Same calibration windows (C4, protocol seed) for Wanda one-shot and LoSA; perplexity: WikiText-2, protocol "
        f"{args.protocol}.",
        "Times are wall seconds on a 2-core CPU shared with other engineers; peak RSS is the whole process "
        "(dense model, Wanda copy freed before LoSA).",
        f"Per-block sparsity and rank per round: {plot.name}.",
    ]
    save_results(args.name, f"LoSA smoke run on {args.model}", rows, protocol=args.protocol, model=args.model,
                 notes=notes, extra={"rounds": [r.__dict__ for r in res.rounds], "blocks": res.blocks,
                                     "timing": res.timing, "config": cfg.to_dict()})


if __name__ == "__main__":
    main()
