"""Where SmolLM2-135M's decode time goes on the PyTorch engines, and how the sparse kernel behaves with
warm vs streamed weights and with 1 vs 2 threads (issue 9: "state where the time goes").

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_decode_breakdown.py

Part 1 (per token, median of 3 rounds of 16 decode steps after a 128-token prefill, 2 threads):
total, block linears (nn.Linear or SparseLinear, timed around each call), lm_head, and the rest
(attention, norms, rotary, HF's Python) for torch-cpu dense and torch-sparse Wanda 70 % / 2:4.
Part 2 (per call, batch 1, 70 % per-row magnitude, SmolLM2's four shapes): "warm" = one matrix
called 30 times (cache-resident, the layer benchmark's regime); "streamed" = 30 different matrices
in turn after touching a 96 MB buffer (each weight read once, as in a decode step), at 1 and 2
threads. Uses the checkpoints cached by ``bench_latency.py --prepare-only``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")

from sparse_runtime.kernels import SparseLinear, choose_gemv_variant, gemv_choice, pack  # noqa: E402
from sparse_runtime.report import save_results  # noqa: E402
from sparse_runtime.sparsity import topk_prune_mask  # noqa: E402

_ACC: dict[str, float] = {}


def _timed(key: str, fn, *a):
    t = time.perf_counter()
    y = fn(*a)
    _ACC[key] = _ACC.get(key, 0.0) + time.perf_counter() - t
    return y


def instrument(vocab: int) -> None:
    """Time every block linear and the lm_head (told apart by its vocab-sized output)."""
    lin_fwd, sp_fwd = torch.nn.Linear.forward, SparseLinear.forward

    def lin(self, x):
        key = "lm_head ms" if self.out_features == vocab else "block linears ms"
        return _timed(key, lin_fwd, self, x)

    torch.nn.Linear.forward = lin
    SparseLinear.forward = lambda self, x: _timed("block linears ms", sp_fwd, self, x)


def breakdown(threads: int) -> list[dict]:
    from sparse_runtime.models.loading import cache_dir, ensure_smollm2
    from sparse_runtime.runtime import load_engine

    root = cache_dir() / "bench-latency"
    ids = np.random.default_rng(0).integers(0, 40000, size=(1, 128)).astype(np.int64)
    rows = []
    for label, engine, path in [("dense", "torch-cpu", ensure_smollm2()), ("wanda-70", "torch-sparse", root / "wanda-70"),
                                ("wanda-2:4", "torch-sparse", root / "wanda-24")]:
        e = load_engine(engine, str(path), threads=threads)
        per = []
        for rep in range(4):  # the first round warms up
            e.prefill(ids)
            _ACC.clear()
            t = time.perf_counter()
            for _ in range(16):
                e.decode(ids[:, :1])
            total = (time.perf_counter() - t) / 16 * 1e3
            if rep:
                per.append({"total ms": total, **{k: v / 16 * 1e3 for k, v in _ACC.items()}})
        e.close()
        med = {k: statistics.median(p.get(k, 0.0) for p in per) for k in per[0]}
        med["rest ms"] = med["total ms"] - med.get("block linears ms", 0.0) - med.get("lm_head ms", 0.0)
        rows.append({"part": "decode per token", "engine": engine, "model": label, "threads": threads,
                     **{k: round(v, 2) for k, v in med.items()}})
        print(rows[-1], flush=True)
    return rows


def layers(threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    flush = torch.empty(96 * 2**20 // 4)
    rows = []
    for n, k in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:
        ws = [torch.randn(n, k) for _ in range(30)]
        ws = [w * topk_prune_mask(w.abs(), 0.7, per_row=True) for w in ws]
        mods = [SparseLinear(pack(w, "bitmask"), isa="avx512", batch_threshold=1 << 30) for w in ws]
        x = torch.randn(1, k)
        res = {}
        for mode in ("warm", "streamed"):
            for kind in ("dense", "sparse"):
                ts = []
                for _ in range(7):
                    if mode == "streamed":
                        flush.add_(1.0)
                    t = time.perf_counter()
                    for i in range(30):
                        j = 0 if mode == "warm" else i
                        F.linear(x, ws[j]) if kind == "dense" else mods[j].sparse_forward(x)
                    ts.append((time.perf_counter() - t) / 30 * 1e6)
                res[f"{mode} {kind} us"] = round(statistics.median(ts), 1)
            res[f"{mode} speedup"] = round(res[f"{mode} dense us"] / res[f"{mode} sparse us"], 3)
        rows.append({"part": "layer batch 1, 70 %", "shape": f"{n}x{k}", "threads": threads, **res})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="decode_breakdown")
    a = ap.parse_args()
    from sparse_runtime.kernels import native

    if "avx512" not in native.supported_isas():
        raise SystemExit("this breakdown uses the AVX-512 path; run bench_kernels.py on this CPU instead")
    choose_gemv_variant()
    rows = layers(1) + layers(2)
    instrument(49152)
    rows += breakdown(2)
    notes = ["decode: prefill 128 random tokens, then 16 single-token steps with KV cache; median of 3 timed rounds "
             "after one warm-up round; linears timed around each call (perf_counter), lm_head told apart by its "
             "49152 outputs; rest = total - linears - lm_head",
             "layers: random N(0,1) weights, 70 % per-row magnitude, AVX-512 bitmask kernel; median of 7 rounds of 30 "
             "calls; 'streamed' touches a 96 MB buffer first and walks 30 distinct matrices (the machine reports a "
             "480 MiB shared L3, so 'streamed' is not guaranteed to be DRAM)",
             f"AVX-512 batch-1 form: {gemv_choice()}"]
    save_results(a.name, "Where SmolLM2-135M decode time goes; the sparse kernel warm vs streamed, 1 vs 2 threads",
                 rows, protocol="latency (docs/protocols.md), batch 1", model="SmolLM2-135M-Instruct (fp32)", notes=notes)


if __name__ == "__main__":
    main()
