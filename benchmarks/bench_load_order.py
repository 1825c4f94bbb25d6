"""Does the order in which one process loads models change their latency? (ONNX Runtime, CPU)

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_load_order.py

The latency benchmark holds every model in one process and times them interleaved. If the first
session created is slower than later ones for reasons unrelated to its weights, a dense model
loaded first looks slower than its sparse versions: a "speedup" without any sparse execution.
This loads the SAME two models twice in one process, in the order A, B, A, B (A = Wanda 70 %,
B = dense; then the reverse in a second process), times prefill 1 x 128 interleaved with rotation
(warm-up 1, 9 rounds) and reports the median of each session beside its load position. If only the
weights mattered, the two copies of a model would agree and A vs B would not depend on the order.
Uses the checkpoints and exports cached by ``bench_latency.py --prepare-only``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import run_worker  # noqa: E402  (one fresh process per load order)


def worker(order: list[str], rounds: int, engine: str, threads: int) -> dict:
    import numpy as np

    from sparse_runtime.measure.stats import interleaved_order
    from sparse_runtime.models.loading import cache_dir, ensure_smollm2
    from sparse_runtime.runtime import load_engine

    paths = {"dense": str(ensure_smollm2()), "wanda-70": str(cache_dir() / "bench-latency" / "wanda-70")}
    ids = np.random.default_rng(0).integers(0, 40000, size=(1, 128)).astype(np.int64)
    sessions = {}
    for pos, label in enumerate(order, 1):
        sessions[f"{label} (loaded #{pos})"] = load_engine(engine, paths[label], threads=threads)
    for e in sessions.values():
        e.prefill(ids)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for rnd in interleaved_order(list(sessions), rounds):
        for k in rnd:
            t = time.perf_counter()
            sessions[k].prefill(ids)
            times[k].append(time.perf_counter() - t)
    for e in sessions.values():
        e.close()
    return {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3}
            for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="ort-cpu")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="load_order")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker.split(","), a.rounds, a.engine, a.threads)))
        return
    os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")
    rows = []
    for order in (["wanda-70", "dense", "wanda-70", "dense"], ["dense", "wanda-70", "dense", "wanda-70"]):
        res = run_worker(__file__, ["--worker", ",".join(order), "--rounds", a.rounds, "--engine", a.engine,
                                    "--threads", a.threads])
        first = next(iter(res.values()))["median_ms"]
        for k, v in res.items():
            rows.append({"process order": " -> ".join(order), "session": k, "median ms": round(v["median_ms"], 2),
                         "min-max ms": f"{v['min_ms']:.1f}-{v['max_ms']:.1f}",
                         "vs first-loaded": round(v["median_ms"] / first, 3)})
    from sparse_runtime.report import save_results

    notes = [f"engine {a.engine}, {a.threads} threads, prefill 1 x 128 tokens (random ids, seed 0), warm-up 1, "
             f"{a.rounds} interleaved rounds with rotation; one fresh process per load order",
             "each model is loaded twice in the same process: the two copies hold identical weights"]
    save_results(a.name, f"Load order vs latency in one process ({a.engine})", rows,
                 protocol="latency (docs/protocols.md), load-order control", model="SmolLM2-135M dense and Wanda 70 %",
                 notes=notes)


if __name__ == "__main__":
    main()
