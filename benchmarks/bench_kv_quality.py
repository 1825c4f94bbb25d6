"""What an fp16 K/V cache (``--kv-dtype float16``) costs in quality: the same decode path with an fp32
and an fp16 cache, teacher-forced over WikiText-2, side by side.

    python benchmarks/bench_kv_quality.py --out benchmarks/results --name kv_quality_zen4

Why decode and not the perplexity protocol: the cache's values matter where later tokens read them,
i.e. in the decode steps (the C step, the path ``generate`` and ``serve`` run). Each window of
``--window`` tokens: the first ``--prefill`` prefilled, then every further token decoded one step at
a time with the true next token fed (teacher forcing), collecting the log-probability of each true
token. Reported per cache dtype: the perplexity over those decoded positions, and against fp32: the
relative perplexity change, top-1 agreement of the next-token argmax, and the largest logit
difference. Same engine, weights, windows and threads for both; only ``kv_dtype`` differs.
``--model tiny`` tests the script (a random model on random tokens: figures mean nothing).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--checkpoint", default="wanda-70", help="dense, wanda-50, wanda-70 or wanda-2:4")
    ap.add_argument("--engine", default="sparse-cpu", choices=("sparse-cpu", "lean-cpu"))
    ap.add_argument("--dtype", default="float32", help="the engine's values (float32, int8, ...)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=512, help="tokens per window")
    ap.add_argument("--prefill", type=int, default=64, help="tokens of each window prefilled; the rest decoded")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="directory for <name>.md/.json (default: a temporary directory)")
    ap.add_argument("--name", default="kv_quality")
    args = ap.parse_args()
    if not 1 <= args.prefill < args.window:
        ap.error(f"--prefill {args.prefill}: give at least 1 and fewer than --window ({args.window}) tokens")
    if args.windows < 1:
        ap.error("--windows must be at least 1")
    os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")

    import torch
    from bench_quant_latency import bench_checkpoints, leading_notes, save_bench

    from sparse_runtime.runtime import get_engine
    from sparse_runtime.runtime.base import default_threads

    threads = args.threads or default_threads()
    dense, ckpts = bench_checkpoints(args.model)
    paths = {"dense": dense, **ckpts}
    if args.checkpoint not in paths:
        ap.error(f"--checkpoint {args.checkpoint!r}: choose one of {', '.join(paths)}")
    engines = {kv: get_engine(args.engine)(str(paths[args.checkpoint]), threads=threads, dtype=args.dtype,
                                           kv_dtype=kv) for kv in ("float32", "float16")}
    vocab = engines["float32"].vocab_size
    if args.model == "tiny":
        g = torch.Generator().manual_seed(0)
        stream = torch.randint(0, vocab, (args.windows * args.window,), generator=g)
        source = "random tokens"
    else:
        from sparse_runtime.data.text import tokenize_stream, wikitext2_text

        stream = tokenize_stream(engines["float32"].tokenizer, wikitext2_text())
        source = "WikiText-2 test, consecutive windows from its start"
    if stream.numel() < args.windows * args.window:
        ap.error(f"the text has {stream.numel()} tokens, fewer than --windows x --window")

    nll = {kv: 0.0 for kv in engines}
    count, agree, max_diff = 0, 0, 0.0
    for w in range(args.windows):
        ids = stream[w * args.window:(w + 1) * args.window]
        logits = {}
        for kv, eng in engines.items():
            lean = eng.lean
            lean.prefill(ids[:args.prefill].unsqueeze(0))
            # the step that feeds token t - 1 predicts token t (the prefill's own last logits are not scored)
            rows = [lean.decode_token(int(ids[t - 1])).clone() for t in range(args.prefill + 1, args.window)]
            logits[kv] = torch.stack(rows) if rows else torch.empty(0, vocab)
        target = ids[args.prefill + 1:args.window]  # what each decode step predicts
        for kv in engines:
            lp = torch.log_softmax(logits[kv].double(), -1)
            nll[kv] += -float(lp.gather(1, target.unsqueeze(1)).sum())
        agree += int((logits["float32"].argmax(-1) == logits["float16"].argmax(-1)).sum())
        max_diff = max(max_diff, float((logits["float32"] - logits["float16"]).abs().max()))
        count += int(target.numel())
        print(f"window {w + 1}/{args.windows}: {count} positions", flush=True)
    evidence = {kv: e.evidence().get("sparse_path", "") for kv, e in engines.items()}
    for e in engines.values():
        e.close()

    ppl = {kv: math.exp(nll[kv] / count) for kv in engines}
    rows = [{"K/V cache": kv, "perplexity (decoded positions)": ppl[kv],
             "vs fp32 cache": f"{100 * (ppl[kv] / ppl['float32'] - 1):+.3f} %",
             "top-1 agreement with fp32": (agree / count) if kv == "float16" else 1.0,
             "max abs logit difference vs fp32": max_diff if kv == "float16" else 0.0} for kv in engines]
    notes = [*leading_notes(args.model),
             f"{args.engine} ({args.dtype} values), checkpoint {args.checkpoint}; {args.windows} windows of "
             f"{args.window} tokens ({source}); the first {args.prefill} of each prefilled, the remaining "
             f"positions decoded one C step at a time with the true token fed; {count} decoded positions scored; "
             f"{threads} threads",
             *(f"{kv}: {ev}" for kv, ev in evidence.items())]
    return save_bench(args, "kvq", "fp16 against fp32 K/V cache: decode quality", rows,
                      protocol="teacher-forced decode (this script's docstring), fp32 and fp16 caches side by side",
                      model="SmolLM2-135M-Instruct" if args.model == "smollm2" else "tiny Llama", notes=notes)


if __name__ == "__main__":
    raise SystemExit(main())
