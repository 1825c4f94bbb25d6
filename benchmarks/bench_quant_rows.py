"""Batch-1 quantized product kernels on their own: each scheme's row kernel, warm, on SmolLM2's shapes.

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_quant_rows.py \
        --out benchmarks/results --name quant_rows_zen4

Why: a decode token's time is the memory's when a kernel keeps up with it, and the kernel's own
arithmetic when it does not. This measures the arithmetic alone: one matrix of each of SmolLM2's
four product shapes, called repeatedly through the C entry on one thread (``--threads``), so its
codes stay in the caches (the 3072 x 576 gate/up matrix is 1.8 MB of int8 codes, 0.9 MB of int4:
L2 or L3); a kernel slower here than the memory's pace in a token (docs/protocols.md) is bound by
its instructions there. Rows: weight-only int8 and int4-g64 codes (fp32 activations), W8A8 on dense
and 70 % bitmask int8 codes, W4A8 on dense int4-g64 / int4-g64-asym / int4-g32 codes
(docs/kernels.md "W8A8 decode", "W4A8 decode"; the int8-activation rows only where the CPU has
AVX-512 VNNI). Random weights (speed does not depend on the values); 70 % rows: random masks with
the same count per row. Per row: median of ``--rounds`` timings of ``--calls`` calls, min-max, the
weights (stored or pruned) per ns and the codes' bytes per ns it runs at. ``--quick`` tests the
script.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2: qkv, o, gate_up, down (N, K)
# (label, scheme, layout, activations)
ROWS = [("int8 weight-only", "int8", "dense", "float32"), ("int4-g64 weight-only", "int4-g64", "dense", "float32"),
        ("int8 W8A8", "int8", "dense", "int8"), ("70 % int8 W8A8", "int8", "bitmask", "int8"),
        ("int4-g64 W4A8", "int4-g64", "dense", "int8"), ("int4-g64-asym W4A8", "int4-g64-asym", "dense", "int8"),
        ("int4-g32 W4A8", "int4-g32", "dense", "int8")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200, help="calls per timed round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small shapes, 3 rounds of 5 calls: tests the script")
    ap.add_argument("--out", default=None, help="directory for <name>.md/.json (default: a temporary directory)")
    ap.add_argument("--name", default="quant_rows")
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (a median of fewer says little)")
    os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")

    import torch

    from bench_quant_latency import leading_notes, save_bench

    from sparse_runtime.errors import ConfigError
    from sparse_runtime.kernels import decode as cdec, native
    from sparse_runtime.kernels.layout import pack_quantized
    from sparse_runtime.kernels.quant import QuantLinear
    from sparse_runtime.quant.scheme import QuantScheme, quantize_rtn

    shapes = [(40, 128), (24, 192)] if args.quick else SHAPES
    rounds, calls = (3, 5) if args.quick else (args.rounds, args.calls)
    isa = native.select_isa()
    g = torch.Generator().manual_seed(0)
    rows, skipped = [], []
    for label, scheme, layout, act in ROWS:
        for n, k in shapes:
            w = torch.randn(n, k, generator=g)
            if layout == "bitmask":  # 70 %: the same count kept in every row
                keep = torch.rand(n, k, generator=g).argsort(dim=1) < round(0.3 * k)
                w = w * keep
            p = pack_quantized(quantize_rtn(w, QuantScheme.parse(scheme)), layout)
            try:
                ql = QuantLinear(p, isa=isa, act=act)
            except ConfigError as e:  # int8 activations need VNNI (refused on the engines' paths)
                skipped.append(f"{label}: {e}")
                break
            if act != "float32" and ql.run_isa == "portable" and isa != "portable":
                skipped.append(f"{label}: no AVX-512 VNNI here (the portable loops are not what a token runs)")
                break
            x, y = torch.randn(k, generator=g), torch.empty(n)
            for _ in range(max(calls // 4, 1)):  # warm the caches
                cdec.run_linear(ql.desc, x, y, args.threads)
            ts = []
            for _ in range(rounds):
                t = time.perf_counter()
                for _ in range(calls):
                    cdec.run_linear(ql.desc, x, y, args.threads)
                ts.append((time.perf_counter() - t) / calls * 1e6)
            us = statistics.median(ts)
            code_bytes = sum(t.numel() * t.element_size() for t in (p.codes, p.index) if t is not None)
            rows.append({"kernel": label, "shape": f"{n} x {k}", "path": ql.run_isa, "us": us,
                         "min-max": f"{min(ts):.4g}-{max(ts):.4g}", "weights / ns": n * k / us / 1e3,
                         "code bytes / ns": code_bytes / us / 1e3})
    notes = [*leading_notes("tiny" if args.quick else "smollm2"),
             f"batch 1, {args.threads} thread(s), kernel path asked: {isa}; each matrix called {calls} times per round "
             f"after a warm-up, {rounds} rounds, median (us per call) and min-max; warm: the codes stay in the caches",
             "weights / ns: stored and pruned weights (N x K) per nanosecond; code bytes / ns: the codes (and the "
             "bitmask) read per nanosecond, scales left out", *(f"skipped {s}" for s in skipped)]
    return save_bench(args, "rows", "Quantized product kernels, warm, batch 1", rows,
                      protocol="kernel microbenchmark (warm, docs/protocols.md)",
                      model="SmolLM2-135M shapes, random weights" if not args.quick else "small shapes (--quick)",
                      notes=notes)


if __name__ == "__main__":
    raise SystemExit(main())
