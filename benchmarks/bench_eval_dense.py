"""Dense zero-shot accuracy of a model on the eight tasks (lm-eval conventions), with a stated limit.

    python benchmarks/bench_eval_dense.py [--model smollm2-135m] [--limit 200] [--tasks all]

Saves benchmarks/results/zeroshot_dense.{md,json}. Run under the shared lock on a shared machine:
``flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_eval_dense.py``.
"""
from __future__ import annotations

import argparse
import time

import torch

import sparse_runtime as sr
from sparse_runtime.data.zeroshot import TASK_SETS
from sparse_runtime.eval.zeroshot import evaluate_zeroshot
from sparse_runtime.report import save_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=sr.DEFAULT_MODEL)
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--limit", type=int, default=200, help="first N items per task (0 = all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--name", default="zeroshot_dense")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    limit = args.limit or None
    t0 = time.perf_counter()
    lm = sr.load_model(args.model)
    load_s = time.perf_counter() - t0
    r = evaluate_zeroshot(lm.model, lm.tokenizer, tasks=args.tasks, limit=limit, batch_size=args.batch_size,
                          data_dir=args.data_dir)
    rows = [{"task": x["task"], "n": x["n"], "limit": x["limit"], "acc": round(x["acc"], 4),
             "acc_stderr": round(x["acc_stderr"], 4),
             "acc_norm": None if x["acc_norm"] is None else round(x["acc_norm"], 4),
             "requests": x["requests"], "wall s": x["seconds"]} for x in r.rows]
    by_task = {x["task"]: x["acc"] for x in r.rows}
    for label in ("wanda", "atp", "all"):
        if all(t in by_task for t in TASK_SETS[label]):
            rows.append({"task": f"mean acc ({label}: {len(TASK_SETS[label])} tasks)",
                         "n": sum(x["n"] for x in r.rows if x["task"] in TASK_SETS[label]), "limit": limit,
                         "acc": round(sum(by_task[t] for t in TASK_SETS[label]) / len(TASK_SETS[label]), 4)})
    protocol = f"zero-shot, 0-shot, {r.limit_note()}"
    save_results(args.name, f"Dense zero-shot accuracy: {args.model}", rows, protocol=protocol, model=args.model,
                 notes=[f"{r.limit_note()}: a quick variant, NOT the full sets (docs/protocols.md); stderr is lm-eval's "
                        "sample stderr of the mean",
                        "scoring: lm-eval-harness conventions (summed continuation log-likelihood; acc = argmax; "
                        "acc_norm = argmax of loglik / choice length in UTF-8 bytes; WinoGrande partial scoring; "
                        "prompts of lm-eval's task YAMLs); the pruning papers report acc",
                        "sets: wanda = BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA; atp = PIQA instead of "
                        "RTE; all = the eight",
                        "HellaSwag comes from a converted text file whose ctx is not re-capitalised as lm-eval does: "
                        "it can differ slightly from lm-eval's figure",
                        f"fp32, batch {args.batch_size}, torch threads {torch.get_num_threads()}; model load "
                        f"{load_s:.1f} s; total zero-shot wall time {r.seconds:.1f} s",
                        "The embedded model is SmolLM2-135M-Instruct dequantised from Q4_1 GGUF"],
                 out_dir=args.out_dir, extra={"zeroshot": r.as_dict()})


if __name__ == "__main__":
    main()
