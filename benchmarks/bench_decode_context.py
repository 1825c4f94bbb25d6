"""Batch-1 decode ms/token of our lean engines as the context grows, with the attention stage's share.

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_decode_context.py \
        --out benchmarks/results --name decode_context_zen4

Why: a decode token reads every weight once, and every cached K/V row of every layer once. At 128
tokens of context the cache is a few MB beside SmolLM2's 70-130 MB of weights; at 2048 (fp32 cache,
30 layers x 3 kv heads x 64 dims x 2) it is ~94 MB, more than a 70 % int8 model's weights, so the
attention stage decides long-context decode and what sparsity buys there.

Rows: dense int8 codes (weight-only; issue 21's "our dense int8 path") and the Wanda 70 % int8 model
with int8 activations (W8A8, the fastest 70 % decode; weight-only int8 where the CPU has no AVX-512
VNNI, said in the row's label), optionally the fp32 pair (``--fp32``), each with every K/V cache dtype
of ``--kv-dtypes`` (``float16``: the rows marked "fp16 K/V", half the cache's bytes). Per
context: prefill the context (untimed), then ``--steps`` single-token steps, ms/token; every row once
per round in a rotated order, ``--rounds`` rounds, median with min-max; the attention stage from the
C step's stage profile (thread 0's time between barriers, so it includes waiting for the other
threads); the K/V MB a token reads (every cached position of every layer) and the rate that makes;
and the per-round ratio dense int8 / 70 % W8A8 (within one cache dtype). ``--dense-a8`` adds dense
int8 with W8A8 (the 70 % W8A8 row's like for like) and dense int4-g64 with W4A8; ``--stages`` puts
every stage of the profile in the rows (where a token's time goes: norms, qkv, RoPE and cache
append, attention, o_proj, gate_up, SiLU-mul, down, lm_head). ``--attn-forms`` times every row twice
per round, once as the engines run (equal shares of the (kv head, position) pairs per thread) and once
with every kv head cut into one range per thread (the rows marked "[ranges]";
``kernels.decode.attn_form("ranges")`` around that row's steps), so the two forms meet the same drift.
``--bytes-only`` times every W8A8 row a second time per round with its products only reading their
bytes (the rows marked "[bytes only]", ``kernels.decode.bytes_only()`` around that row's steps: wrong
results by design, the time the bytes take to arrive in this token), with the per-round ratio of the
real dense int8 row to it: the floor any kernel for the format meets on this machine, beside the
ratio the real kernels reach (docs/kernels.md "The format's floor inside the token").
Before every row's steps each thread of the team runs the same short dependent chain
(``kernels.decode.thread_pace``); a note gives each thread's pace over the rounds and how many rounds
had a thread at least 1.3x slower than the fastest (on a VM, a vCPU time-shared with another guest:
docs/protocols.md "Machine pace"), and the JSON keeps it per round.
``--model tiny`` tests the script.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (label, engine, checkpoint key, engine options)
ROWS = [("dense int8", "lean-cpu", "dense", {"dtype": "int8"}),
        ("70 % int8 + W8A8", "sparse-cpu", "wanda-70", {"dtype": "int8", "act_dtype": "int8"})]
FP32_ROWS = [("dense fp32", "lean-cpu", "dense", {}), ("70 % fp32", "sparse-cpu", "wanda-70", {})]
DENSE_A8 = [("dense int8 + W8A8", "lean-cpu", "dense", {"dtype": "int8", "act_dtype": "int8"}),
            ("dense int4-g64 + W4A8", "lean-cpu", "dense", {"dtype": "int4-g64", "act_dtype": "int8"})]
REF = ROWS[0][0]


PACE_ITERS = 200_000  # ~50 us a sample (kernels.decode.thread_pace), one before every row's steps


def pace_note(ctx: int, pace: list[list[float]]) -> str:
    """One line on the vCPUs' pace over the timed rounds at context ctx: each thread's median and
    min-max (us for the same chain; docs/protocols.md "Machine pace") and how many rounds had a thread
    at least 1.3x slower than the fastest."""
    per_thread = list(zip(*pace))
    uneven = sum(1 for p in pace if max(p) >= 1.3 * min(p))
    return (f"vCPU pace at context {ctx} (kernels.decode.thread_pace: the same dependent chain on every thread, us, "
            f"sampled before every row's steps; per round each thread's median): "
            + ", ".join(f"thread {i} {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"
                        for i, v in enumerate(per_thread))
            + f"; rounds with a thread >= 1.3x the fastest: {uneven} of {len(pace)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--contexts", default="128,512,1024,2048")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per round and context")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fp32", action="store_true", help="also the fp32 dense and 70 %% rows")
    ap.add_argument("--dense-a8", action="store_true",
                    help="also dense int8 with W8A8 (the like-for-like row of the 70 %% W8A8 one) and dense int4-g64 "
                         "with W4A8 (AVX-512 VNNI only)")
    ap.add_argument("--stages", action="store_true",
                    help="every stage of the C step's profile in the rows (ms/token), not only attention")
    ap.add_argument("--kv-dtypes", default="float32",
                    help="the K/V cache dtypes to run every row with, comma-separated (float32, float16)")
    ap.add_argument("--attn-forms", action="store_true",
                    help="also every row with the attention's other form: every kv head cut into one range per thread")
    ap.add_argument("--bytes-only", action="store_true",
                    help="also every W8A8 row with its products only reading their bytes (wrong results; the "
                         "format's timing floor in the token)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="directory for <name>.md/.json (default: a temporary directory)")
    ap.add_argument("--name", default="decode_context")
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (a median of fewer says little)")
    from bench_quant_latency import count_list

    contexts = count_list(ap, "--contexts", args.contexts, "token", "128,1024")
    kv_dtypes = args.kv_dtypes.split(",")
    if not kv_dtypes or any(k not in ("float32", "float16") for k in kv_dtypes):
        ap.error(f"--kv-dtypes {args.kv_dtypes!r}: give float32 and/or float16, separated by commas")
    os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")

    import torch
    from transformers import AutoConfig

    from _common import kv_bytes_per_token
    from bench_quant_latency import bench_checkpoints, leading_notes, save_bench

    from sparse_runtime.errors import ConfigError
    from sparse_runtime.kernels import decode as cdec
    from sparse_runtime.runtime import get_engine
    from sparse_runtime.runtime.base import benchmark_ids, default_threads

    threads = args.threads or default_threads()
    dense, ckpts = bench_checkpoints(args.model)
    paths = {"dense": str(dense), **{k: str(v) for k, v in ckpts.items()}}
    engines, fallbacks = {}, []
    a8_rows: list[str] = []  # the rows whose products are W8A8 (what --bytes-only times again)
    kv_bytes: dict[str, int] = {}  # bytes per cached element of each row
    ref_of: dict[str, str] = {}  # the 70 % row of each K/V dtype -> the dense int8 row it is compared with
    for kv_dtype in kv_dtypes:
        suffix = "" if kv_dtype == "float32" else ", fp16 K/V"
        group = []
        for label, name, key, opts in ROWS + (FP32_ROWS if args.fp32 else []) + (DENSE_A8 if args.dense_a8 else []):
            label, opts = label + suffix, {**opts, "kv_dtype": kv_dtype}
            try:
                engines[label] = get_engine(name)(paths[key], threads=threads, **opts)
                if opts.get("act_dtype") and opts.get("dtype") == "int8":  # W8A8 (W4A8 has no bytes-only form)
                    a8_rows.append(label)
            except ConfigError as e:  # W8A8 needs AVX-512 VNNI: weight-only int8 is that CPU's fastest 70 % decode
                if "act_dtype" not in opts:
                    raise
                if key == "dense":  # no weight-only stand-in: dense weight-only int8 is the first row already
                    fallbacks.append(f"{label}: not run, W8A8 refused ({e})")
                    continue
                label = label.replace(" + W8A8", " (weight-only: no W8A8 here)")
                fallbacks.append(f"{label}: W8A8 refused ({e})")
                engines[label] = get_engine(name)(paths[key], threads=threads,
                                                  **{k: v for k, v in opts.items() if k != "act_dtype"})
            kv_bytes[label] = 2 if kv_dtype == "float16" else 4
            group.append(label)
        ref_of[group[1]] = group[0]
    labels = list(engines)
    RANGES = " [ranges]"
    form0 = cdec.attn_form()  # the engines' own form, restored after each "[ranges]" row
    if args.attn_forms:  # the same engines, timed a second time per round in the ranges form
        for k in list(labels):
            labels.append(k + RANGES)
            kv_bytes[k + RANGES] = kv_bytes[k]
        ref_of.update({f + RANGES: d + RANGES for f, d in ref_of.items()})
    BYTES = " [bytes only]"
    if args.bytes_only:  # the W8A8 engines again per round, their products only reading their bytes
        refs = dict(ref_of)
        for k in a8_rows:
            labels.append(k + BYTES)
            kv_bytes[k + BYTES] = kv_bytes[k]
            if k in refs:  # against the real dense int8 row: the floor of the ratio
                ref_of[k + BYTES] = refs[k]
    cfg = AutoConfig.from_pretrained(paths["dense"])  # the local checkpoint's config.json
    vocab = engines[labels[0]].vocab_size

    rows = []
    raw: dict[str, dict[str, list]] = {}
    pace_notes: list[str] = []
    for ctx in contexts:
        ids = torch.from_numpy(benchmark_ids(vocab, 1, ctx, 0))
        total = {k: [] for k in labels}
        attn = {k: [] for k in labels}
        stage_ms = {k: {st: [] for st in cdec.STAGES} for k in labels}
        pace: list[list[float]] = []  # per timed round: each thread's median vCPU pace (us) over its rows
        for r in range(args.rounds + 1):  # round 0 warms up (cache growth, first touches)
            samples = []
            for k in labels[r % len(labels):] + labels[:r % len(labels)]:
                samples.append(cdec.thread_pace(threads, PACE_ITERS))
                lean = engines[k.removesuffix(RANGES).removesuffix(BYTES)].lean
                cdec.attn_form("ranges" if k.endswith(RANGES) else form0)
                lean.prefill(ids)
                with cdec.bytes_only() if k.endswith(BYTES) else contextlib.nullcontext():
                    cdec.profile_start()
                    t = time.perf_counter()
                    for i in range(args.steps):
                        lean.decode_token(100 + i)
                    ms = (time.perf_counter() - t) * 1e3 / args.steps
                stages = cdec.profile_stop()
                cdec.attn_form(form0)
                if r:
                    total[k].append(ms)
                    attn[k].append(stages["attention"] * 1e3 / args.steps)
                    for st in cdec.STAGES:
                        stage_ms[k][st].append(stages[st] * 1e3 / args.steps)
            if r:
                pace.append([statistics.median(v) for v in zip(*samples)])
                print(f"context {ctx} round {r}/{args.rounds}: "
                      + ", ".join(f"{k} {total[k][-1]:.3f}" for k in labels), flush=True)
        for k in labels:
            kv = kv_bytes_per_token(cfg, ctx, args.steps, kv_bytes[k]) / 1e6
            a = statistics.median(attn[k])
            row = {"context": ctx, "row": k, "decode ms/token": statistics.median(total[k]),
                   "min-max": f"{min(total[k]):.4g}-{max(total[k]):.4g}", "attention ms": a,
                   "attention share": a / statistics.median(total[k]), "K/V MB/token": kv,
                   "K/V GB/s in attention": kv / a if a > 0 else None}
            if k in ref_of:
                ratios = [d / f for d, f in zip(total[ref_of[k]], total[k])]
                row[f"{REF} / this, per round: median"] = statistics.median(ratios)
                row["ratio min-max"] = f"{min(ratios):.3g}-{max(ratios):.3g}"
            if args.stages:
                row.update({f"{st} ms": statistics.median(stage_ms[k][st]) for st in cdec.STAGES})
            rows.append(row)
        raw[str(ctx)] = {"total_ms": total, "attention_ms": attn, "stage_ms": stage_ms, "vcpu_pace_us": pace}
        pace_notes.append(pace_note(ctx, pace))
    evidence = {k: e.evidence().get("sparse_path", "") for k, e in engines.items()}
    for e in engines.values():
        e.close()

    notes = [*leading_notes(args.model),
             f"decode batch 1: each context prefilled (untimed), then {args.steps} single-token steps, ms/token; "
             f"{args.rounds} rounds after one warm-up round, every row once per round in a rotated order; "
             f"median, min-max; {threads} threads; all rows loaded together",
             "attention ms: the C step's stage profile (sr_decode_profile: thread 0's time between barriers, "
             "so it includes waiting for the slowest thread and the merge of the threads' partials)",
             "K/V MB/token: every cached position of every layer, K and V (fp32, or fp16 in the rows marked "
             "'fp16 K/V': --kv-dtype float16), averaged over the timed steps; GB/s = that / attention ms",
             *pace_notes,
             *(["<stage> ms: every stage of the same profile, ms/token (median over the rounds); they sum to "
                "about the token (the rest: Python's call and the embedding row)"] if args.stages else []),
             *(f"{k}: {v}" for k, v in evidence.items()), *fallbacks,
             *([f"'{RANGES.strip()}' rows: the same engine as the row without it, timed with "
                f"kernels.decode.attn_form('ranges') (every kv head's positions cut into one range per thread, "
                f"every head's partials merged; the engines' own form gives every thread an equal, contiguous "
                f"share of the (kv head, position) pairs and merges only the heads cut between shares)"]
               if args.attn_forms else []),
             *([f"'{BYTES.strip()}' rows: the same engine as the row without it, timed inside "
                f"kernels.decode.bytes_only(): every W8A8 product quantizes its input, then only reads its "
                f"weight bytes (flat, a line at a time: codes, then mask words) and writes zeros, so the "
                f"outputs are wrong by design and the time is what the products' bytes take to arrive in the "
                f"token; the other stages (attention, norms, lm_head when not W8A8) run as usual. Its ratio "
                f"column is against the real dense int8 row: what no kernel for the format can beat here"]
               if args.bytes_only else [])]
    return save_bench(args, "ctx", "Decode ms/token as the context grows, and the attention stage", rows,
                      protocol="latency (docs/protocols.md), batch-1 decode at several contexts",
                      model="SmolLM2-135M-Instruct" if args.model == "smollm2" else "tiny Llama",
                      notes=notes, extra={"times_ms": raw})


if __name__ == "__main__":
    raise SystemExit(main())
