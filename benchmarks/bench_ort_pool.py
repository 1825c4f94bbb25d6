"""ORT with our SparseLinear op: rows on ORT's intra-op pool vs on the extension's OpenMP pool.

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_ort_pool.py [--tag avx2]

SmolLM2-135M decode (batch 1, 16 steps after a 128-token prefill, ms/token), 2 threads: ort-cpu on
the dense model and on the Wanda-70 checkpoint of bench_latency.py, and ort-sparse on the Wanda-70
checkpoint with ``pool="ort"`` (default: each product's rows split over ORT's own pool by
KernelContext_ParallelFor) and ``pool="openmp"`` (a second pool beside ORT's). All four in one
process, timed in the same interleaved rounds; medians. Saved as ``ort_pool[_TAG].{md,json}``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import cpu_times, machine_state  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args(argv)

    from sparse_runtime.kernels.ort import POOLS
    from sparse_runtime.models.loading import cache_dir
    from sparse_runtime.report import save_results
    from sparse_runtime.runtime import Scenario, load_engine

    w70 = cache_dir() / "bench-latency" / "wanda-70"
    if not (w70 / "sparsity_manifest.json").is_file():
        raise SystemExit(f"no Wanda-70 checkpoint at {w70}: run benchmarks/bench_latency.py --prepare-only first")
    state0, load0 = cpu_times(), os.getloadavg()[0]
    engines = {("ort-cpu", "dense", "-"): load_engine("ort-cpu", "smollm2-135m", threads=a.threads),
               ("ort-cpu", "wanda-70", "-"): load_engine("ort-cpu", str(w70), threads=a.threads)}
    for pool in POOLS:
        engines[("ort-sparse", "wanda-70", pool)] = load_engine("ort-sparse", str(w70), threads=a.threads, pool=pool)
    sc = Scenario("decode", 128, 1, 16)
    units = {k: e.timer(sc) for k, e in engines.items()}
    for u in units.values():
        u()
    times = {k: [] for k in units}
    keys = list(units)
    for r in range(a.repeats):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[k].append(sc.per_unit(units[k]()))
    dense = statistics.median(times[("ort-cpu", "dense", "-")])
    rows = [{"engine": e, "model": m, "pool": p, "threads": a.threads, "decode ms/token": statistics.median(v),
             "min-max": f"{min(v):.3g}-{max(v):.3g}", "vs ort-cpu dense": dense / statistics.median(v),
             "evidence": engines[(e, m, p)].evidence().get("sparse_path", "")}
            for (e, m, p), v in times.items()]
    save_results("ort_pool" + (f"_{a.tag}" if a.tag else ""),
                 "ORT + SparseLinear: rows on ORT's pool vs on a second (OpenMP) pool", rows,
                 protocol=f"latency, decode batch 1 @ ctx 128, 16 steps, {a.repeats} interleaved rounds, "
                          f"threads {a.threads}", model="SmolLM2-135M-Instruct (fp32)",
                 notes=["all engines in one process; rounds rotate the order; medians",
                        machine_state(state0, load0)], out_dir=a.out_dir)


if __name__ == "__main__":
    main()
