"""Software prefetch in the batch-1 row kernels, on and off in the same run (docs/kernels.md "Prefetch").

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_prefetch.py --out-dir benchmarks/results
    python benchmarks/bench_prefetch.py --slice /work/scale/slice --name prefetch_7b_slice --out-dir ...

Protocol: ``sparse-cpu`` engines (the lean C decode step), 2 threads, for each model x values (fp32,
int8 codes): a 64-token prefill, then decode tokens (ms/token, median of ``--steps`` after 3 warm-up
tokens); ``--rounds`` interleaved rounds, each timing every engine with every prefetch distance
(``sr_set_row_prefetch``: bytes ahead of each stream, 0 = off) so drift hits all alike; the row is
the median over rounds with the min-max. Models: SmolLM2-135M dense and Wanda 70 % (the checkpoints
of ``bench_latency.py``), or with ``--slice DIR`` the 7B depth slice of ``bench_latency_7b_slice.py``
(``DIR/dense``, ``DIR/w70``). Results go to ``--out-dir`` (default
``$SPARSE_RUNTIME_CACHE/bench-prefetch``, outside the repository).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--distances", default="0,2048", help="bytes ahead (0 = off); the first is the baseline")
    ap.add_argument("--values", default="float32,int8")
    ap.add_argument("--slice", default=None, help="the 7B slice directory (dense/, w70/) instead of SmolLM2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="prefetch")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    from sparse_runtime.kernels import native
    from sparse_runtime.models.loading import cache_dir, ensure_smollm2
    from sparse_runtime.report import save_results
    from sparse_runtime.runtime import load_engine

    if args.slice:
        models = {"dense": Path(args.slice) / "dense", "wanda-70": Path(args.slice) / "w70"}
        label = f"LLaMA-2-7B depth slice ({args.slice})"
    else:
        models = {"dense": ensure_smollm2(), "wanda-70": cache_dir() / "bench-latency" / "wanda-70"}
        label = "SmolLM2-135M"
    for k, p in models.items():
        if not Path(p).exists():
            raise SystemExit(f"{k}: {p} is missing; run benchmarks/bench_latency.py --prepare-only (or "
                             f"bench_latency_7b_slice.py --prepare-only for --slice)")
    dists = [int(d) for d in args.distances.split(",")]
    lb = native.lib()
    engines = {}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 30000, (1, 64), generator=g)
    for v in args.values.split(","):
        for m, p in models.items():
            e = load_engine("sparse-cpu", str(p), threads=args.threads, dtype=v)
            engines[(m, v)] = e
    times: dict[tuple, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for d in dists:
                lb.sr_set_row_prefetch(d)
                for key, e in engines.items():
                    lean = e.lean
                    lean.prefill(prompt)
                    for _ in range(3):
                        lean.decode_token(5)
                    per = []
                    for _ in range(args.steps):
                        t = time.perf_counter()
                        lean.decode_token(5)
                        per.append(time.perf_counter() - t)
                    times.setdefault((*key, d), []).append(statistics.median(per) * 1e3)
    finally:  # (the distance stays as last set: this process ends here)
        for e in engines.values():
            e.close()
    rows = []
    for (m, v, d), ts in times.items():
        base = statistics.median(times[(m, v, dists[0])])
        med = statistics.median(ts)
        rows.append({"model": m, "values": v, "prefetch bytes": d, "ms/token": round(med, 2),
                     "range": f"{min(ts):.2f}-{max(ts):.2f}", f"speedup vs {dists[0]}": round(base / med, 3)})
    rows.sort(key=lambda r: (r["values"], r["model"], r["prefetch bytes"]))
    notes = [f"sparse-cpu, {args.threads} threads, lean C decode step; per engine: 64-token prefill, 3 warm-up "
             f"tokens, median of {args.steps} decode tokens; {args.rounds} interleaved rounds (every engine with "
             "every distance per round), median over rounds with min-max",
             "prefetch bytes: how far ahead each batch-1 row kernel prefetches its values/codes and mask streams "
             "(sr_set_row_prefetch; 0 = off, 2048 = the compiled default); dense fp32 linears use a kernel "
             "without it (they already run at memory speed)"]
    save_results(args.name, f"Row-kernel prefetch on and off: {label}", rows, protocol="bench_prefetch",
                 model=label, notes=notes, out_dir=args.out_dir or str(cache_dir() / "bench-prefetch"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
