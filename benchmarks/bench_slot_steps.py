"""The serving slots' batched decode step (B sequences advance one token in one C call) per value type.

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_slot_steps.py \
        --out benchmarks/results --name slot_steps_zen4

Why: ``serve`` batches the sequences it holds into one step (docs/serving.md), whose products read
each weight once for the B tokens (docs/kernels.md), so a value type's batched kernel, not only its
batch-1 one, decides serving throughput. Rows: SmolLM2 dense with int8 codes (weight-only, W8A8) and
int4-g64 codes (weight-only, W4A8), each at ``--batches`` sequences (the int8-activation rows only
where the CPU has AVX-512 VNNI). Per row and B: B slots prefilled with 32 tokens each, then
``--steps`` batched steps timed, ``--rounds`` rounds rotated across the rows, median ms per step with
min-max, and tokens per second (B / step). ``--model tiny`` tests the script.
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

ROWS = [("int8 weight-only", {"dtype": "int8"}), ("int8 + W8A8", {"dtype": "int8", "act_dtype": "int8"}),
        ("int4-g64 weight-only", {"dtype": "int4-g64"}), ("int4-g64 + W4A8", {"dtype": "int4-g64", "act_dtype": "int8"})]
PROMPT = 32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--batches", default="1,4,8", help="sequences per step, comma-separated")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="directory for <name>.md/.json (default: a temporary directory)")
    ap.add_argument("--name", default="slot_steps")
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (a median of fewer says little)")
    from bench_quant_latency import count_list

    batches = count_list(ap, "--batches", args.batches, "sequence", "1,4,8")
    os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")

    import torch

    from bench_quant_latency import bench_checkpoints, leading_notes, save_bench

    from sparse_runtime.errors import ConfigError
    from sparse_runtime.runtime import get_engine
    from sparse_runtime.runtime.base import default_threads

    threads = args.threads or default_threads()
    dense, _ = bench_checkpoints(args.model)
    engines, skipped = {}, []
    for label, opts in ROWS:
        try:
            engines[label] = get_engine("lean-cpu")(str(dense), threads=threads, **opts)
        except ConfigError as e:  # int8 activations need AVX-512 VNNI
            skipped.append(f"{label}: {e}")
    labels = list(engines)
    vocab = engines[labels[0]].vocab_size
    rows, raw = [], {}
    for B in batches:
        times = {k: [] for k in labels}
        for k in labels:  # B slots, each with its own prompt
            lean = engines[k].lean
            lean.init_slots(B, PROMPT + (args.rounds + 1) * args.steps + 8)
            for s in range(B):
                lean.prefill_slot(s, (torch.arange(PROMPT) * (s + 3)) % vocab)
        for r in range(args.rounds + 1):  # round 0 warms up
            for k in labels[r % len(labels):] + labels[:r % len(labels)]:
                lean = engines[k].lean
                t = time.perf_counter()
                for i in range(args.steps):
                    lean.decode_slots(list(range(B)), [(100 + i + s) % vocab for s in range(B)])
                if r:
                    times[k].append((time.perf_counter() - t) * 1e3 / args.steps)
        for k in labels:
            ms = statistics.median(times[k])
            rows.append({"sequences": B, "row": k, "ms/step": ms,
                         "min-max": f"{min(times[k]):.4g}-{max(times[k]):.4g}", "tokens/s": B / ms * 1e3})
        raw[str(B)] = times
    evidence = {k: e.evidence().get("sparse_path", "") for k, e in engines.items()}
    for e in engines.values():
        e.close()
    notes = [*leading_notes(args.model),
             f"lean-cpu on the dense checkpoint; per B: B slots prefilled with {PROMPT} tokens each, then "
             f"{args.steps} batched steps (decode_slots, one C call each) per round, {args.rounds} rounds after one "
             f"warm-up, rows rotated per round; median ms per step, min-max; tokens/s = B / step; {threads} threads",
             *(f"{k}: {v}" for k, v in evidence.items()), *(f"skipped {s}" for s in skipped)]
    return save_bench(args, "slots", "The serving slots' batched decode step per value type", rows,
                      protocol="latency (docs/protocols.md), batched decode steps",
                      model="SmolLM2-135M-Instruct" if args.model == "smollm2" else "tiny Llama",
                      notes=notes, extra={"times_ms": raw})


if __name__ == "__main__":
    raise SystemExit(main())
