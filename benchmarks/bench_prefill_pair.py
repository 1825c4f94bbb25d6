"""Prefill 1 x N of our engines against DeepSparse, alternated call by call (issue 21's prefill bar).

    python benchmarks/bench_prefill_pair.py --out benchmarks/results --name prefill_pair_zen4

Why a second protocol beside ``bench_quant_latency.py``: that script times each runtime's rows as a
group (so no idle thread pool of one runtime competes with another's timed run), one group after
the other, minutes apart. On a VM whose pace drifts by 20-60 % over minutes (the AMD Zen 4 machine of
2026-12-07: our dense fp32 prefill 206 -> 260 ms and DeepSparse's 70 % prefill 87 -> 132 ms between
runs, not together) a ratio across groups then measures the drift as much as the engines. Here every
engine is loaded at once and each round calls each one once, in a rotated order, with a pause before
every call (``--pause``: long enough for OpenMP's spinning threads, ours or DeepSparse's, to sleep, so
no engine's idle pool runs during another's call); the result is the per-round ratio
DeepSparse / ours (median, min, max), which drift moves far less than the two medians.

Rows: our sparse-cpu engine on the Wanda 70 % checkpoint with fp32 prefill and with bf16 prefill
(fp32 values, int8 codes), and DeepSparse's fp32 engine on the same checkpoint. The last position's
logits (``Engine.prefill_next``), as every prefill timer here. ``--model tiny`` tests the script.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

OURS = [("ours, fp32", {}), ("ours, bf16 prefill, fp32 values", {"prefill_dtype": "bfloat16"}),
        ("ours, bf16 prefill, int8 codes", {"prefill_dtype": "bfloat16", "dtype": "int8"})]
DS = "DeepSparse, fp32"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--checkpoint", default="wanda-70", help="which pruned checkpoint (wanda-50, wanda-70, wanda-2:4)")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--pause", type=float, default=0.2, help="seconds of idle before every timed call")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="directory for <name>.md/.json (default: a temporary directory)")
    ap.add_argument("--name", default="prefill_pair")
    args = ap.parse_args()
    if args.rounds < 5:
        ap.error("--rounds must be at least 5 (medians of fewer say little)")
    os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")

    from bench_quant_latency import bench_checkpoints, leading_notes, save_bench

    from sparse_runtime.measure.stats import summarize
    from sparse_runtime.runtime import get_engine
    from sparse_runtime.runtime.base import benchmark_ids, default_threads

    threads = args.threads or default_threads()
    _, ckpts = bench_checkpoints(args.model)
    if args.checkpoint not in ckpts:
        ap.error(f"--checkpoint {args.checkpoint!r}: choose one of {', '.join(ckpts)}")
    ckpt = str(ckpts[args.checkpoint])
    engines, skipped = {}, {}
    for label, opts in OURS:
        engines[label] = get_engine("sparse-cpu")(ckpt, threads=threads, **opts)
    ok, why = get_engine("deepsparse").available()
    if ok:
        engines[DS] = get_engine("deepsparse")(ckpt, threads=threads, prefill_length=args.prefill,
                                               cache_length=args.prefill + 64)
    else:
        skipped[DS] = why
    vocab = next(iter(engines.values())).vocab_size
    ids = benchmark_ids(vocab, 1, args.prefill, 0)
    for e in engines.values():  # warm-up: caches, the measured form choices, DeepSparse's first call
        for _ in range(2):
            e.prefill_next(ids)
    labels = list(engines)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(args.rounds):
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            time.sleep(args.pause)
            t = time.perf_counter()
            engines[k].prefill_next(ids)
            times[k].append((time.perf_counter() - t) * 1e3)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {times[k][-1]:.1f}" for k in labels), flush=True)
    evidence = {k: e.evidence() for k, e in engines.items()}
    for e in engines.values():
        e.close()

    rows = []
    for k in labels:
        s = summarize(times[k])
        row = {"engine": k, "prefill ms": s.median, "IQR": f"{s.q1:.4g}-{s.q3:.4g}",
               "min-max": f"{min(times[k]):.4g}-{max(times[k]):.4g}"}
        if DS in times and k != DS:
            ratios = [d / o for d, o in zip(times[DS], times[k])]
            row["DeepSparse / this, per round: median"] = statistics.median(ratios)
            row["ratio min-max"] = f"{min(ratios):.3g}-{max(ratios):.3g}"
        row["prefill forms"] = str(evidence[k].get("prefill_forms", ""))
        rows.append(row)
    notes = [*leading_notes(args.model),
             f"{args.rounds} rounds; each round calls every engine once (order rotated per round), "
             f"{args.pause} s idle before each call; prefill 1 x {args.prefill}, the last position's logits; "
             f"{threads} threads for every engine; all engines loaded together",
             f"checkpoint: {args.checkpoint} ({ckpt})"]
    for k, why in skipped.items():
        notes.append(f"skipped {k}: {why}")
    return save_bench(args, "pair", "Prefill against DeepSparse, engines alternated call by call", rows,
                      protocol="latency (docs/protocols.md), engines alternated per call with a pause",
                      model=f"SmolLM2-135M-Instruct {args.checkpoint}" if args.model == "smollm2" else "tiny Llama",
                      notes=notes, extra={"times_ms": times})


if __name__ == "__main__":
    raise SystemExit(main())
