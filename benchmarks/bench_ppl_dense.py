"""Dense WikiText-2 perplexity of a model under the `quick` and `paper` protocols, with wall time.

    python benchmarks/bench_ppl_dense.py [--model smollm2-135m] [--protocols quick,paper]

Saves benchmarks/results/ppl_dense.{md,json}.
"""
from __future__ import annotations

import argparse
import time

import torch

import sparse_runtime as sr
from sparse_runtime.report import save_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=sr.DEFAULT_MODEL)
    ap.add_argument("--protocols", default="quick,paper")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--name", default="ppl_dense")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = sr.load_model(args.model)
    load_s = time.perf_counter() - t0
    rows = []
    for proto in args.protocols.split(","):
        r = sr.wikitext2_perplexity(lm.model, lm.tokenizer, proto, args.data_dir)
        rows.append({"model": args.model, "protocol": proto, "seqlen": r.seqlen, "windows": r.windows,
                     "tokens": r.tokens, "perplexity": round(r.ppl, 3), "wall s": round(r.seconds, 1),
                     "s per window": round(r.seconds / r.windows, 2)})
        print(rows[-1], flush=True)
    save_results(args.name, f"Dense WikiText-2 perplexity: {args.model}", rows, protocol=args.protocols,
                 model=args.model,
                 notes=["WikiText-2 raw test tokenized once as one stream, non-overlapping windows, batch 1 "
                        "(docs/protocols.md); `quick` = first 40 windows of 512 tokens, `paper` = all windows of 2048",
                        f"fp32, sdpa attention, torch threads {torch.get_num_threads()}; model load {load_s:.1f} s",
                        "The embedded model is SmolLM2-135M-Instruct dequantised from Q4_1 GGUF: a real "
                        "pretrained model, somewhat below the original bf16 release"])


if __name__ == "__main__":
    main()
