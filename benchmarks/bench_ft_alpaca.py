"""The ``ft-alpaca`` repair run (protocols.md): one epoch of the 5,000 Alpaca records (prompt template,
loss on the response only, 512 tokens) on SmolLM2-135M pruned by Wanda, then the zero-shot suite
(first N items per task: a stated limit) and WikiText-2 ``quick`` perplexity, before and after.

    python benchmarks/bench_ft_alpaca.py --device cuda               # SEFT at 70 % (issue 7): minutes on a GPU
    python benchmarks/bench_ft_alpaca.py --methods seft,masked-lora --sparsity 0.5

One epoch is 625 optimiser steps of 8 sequences: hours on a 2-core CPU, minutes on a GPU. The base is
pruned once (quick calibration) into ``$SR_BENCH_WORK/ft-alpaca`` and reused; each method trains,
merges (exact sparsity, verified by the merge) and is evaluated in a fresh process, so its memory
figures are its own. SEFT uses k = 10 (the paper's commonsense setting, methods.md section 7); every
other option is the method's default. Rows are merged into ``benchmarks/results/<name>.{md,json}``
after every method.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import tf32_training

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = Path(os.environ.get("SR_BENCH_WORK", "/tmp/sr-bench-ftalpaca")) / "ft-alpaca"
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "seft": {"update_every": 10},  # SEFT's commonsense / instruction setting (k = 10)
    "masked-lora": {},
    "lors": {},
    "dense-lora": {},
}


def _eval(model_dir: str, args) -> dict[str, Any]:
    import sparse_runtime as sr
    from sparse_runtime.eval.zeroshot import evaluate_zeroshot

    lm = sr.load_model(model_dir)
    if args.device != "cpu":
        lm.model.to(args.device)
    p = sr.wikitext2_perplexity(lm.model, lm.tokenizer, "quick", args.data_dir)
    z = evaluate_zeroshot(lm.model, lm.tokenizer, tasks=args.tasks, limit=args.limit, batch_size=8,
                          data_dir=args.data_dir)
    return {"ppl": p.ppl, "zeroshot": z.as_dict()}


def worker(args) -> dict[str, Any]:
    """One configuration in this (fresh) process: ``base`` = prune + evaluate, else train, merge, evaluate."""
    import torch

    import sparse_runtime as sr

    torch.set_num_threads(args.threads)
    base = WORK / f"base-wanda-{int(round(args.sparsity * 100))}"
    if args.worker == "base":
        if not (base / "sparsity_manifest.json").is_file():
            cfg = sr.PruneConfig(method="wanda", sparsity=args.sparsity, protocol="quick",
                                 device=None if args.device == "cpu" else args.device)
            sr.prune_checkpoint(args.model, cfg, base, overwrite=True, data_dir=args.data_dir, plot=False)
        return {"config": f"wanda-{int(round(args.sparsity * 100))} (no fine-tuning)", **_eval(str(base), args)}
    from sparse_runtime.merge import merge_adapter_dir
    from sparse_runtime.training import TrainConfig, finetune

    method = args.worker
    run = WORK / f"{method}-{base.name}"
    tc = TrainConfig(method=method, data="alpaca", seq_len=512, batch_size=8, steps=args.steps, seed=0,
                     loss_chunk_tokens=1024)
    t0 = time.perf_counter()
    with tf32_training(args.tf32):  # evaluation stays full fp32
        res, lm = finetune(str(base), run / "adapter", tc, dict(METHOD_OPTIONS[method]), data_dir=args.data_dir,
                           overwrite=True, device=None if args.device == "cpu" else args.device)
    train_s = time.perf_counter() - t0
    del lm
    merged, rep = merge_adapter_dir(run / "adapter", run / "merged", overwrite=True, data_dir=args.data_dir)
    out = {"config": f"{method} @ wanda-{int(round(args.sparsity * 100))}", "steps": res.steps, "tokens": res.tokens,
           "trainable": res.trainable_parameters, "train_s": train_s, "peak_train_cuda_mb": res.peak_device_mb,
           "peak_train_rss_mb": res.peak_rss_mb, "final_loss": res.losses[-1] if res.losses else None,
           "merge": rep.as_dict(), "tf32_training": bool(args.tf32), **_eval(str(merged), args)}
    ev = rep.as_dict().get("mask_evolution") or {}
    if ev:
        out["resurrected"] = sum(v["resurrected"] for v in ev.values())
    return out


def row_of(res: dict[str, Any], wall: float) -> dict[str, Any]:
    z = res["zeroshot"]
    row = {"config": res["config"], "ppl (quick)": res["ppl"], "zero-shot mean acc": z["mean_acc"]}
    row.update({r["task"]: r["acc"] for r in z["rows"]})
    row.update({"steps": res.get("steps"), "train s": res.get("train_s"),
                "peak train CUDA MB": res.get("peak_train_cuda_mb"), "resurrected": res.get("resurrected"),
                "wall s": wall, "detail": res})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--methods", default="seft", help=f"comma list of {', '.join(METHOD_OPTIONS)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls while training on a GPU (evaluation stays fp32)")
    ap.add_argument("--steps", type=int, default=None, help="default: one epoch (625 steps); fewer = a REDUCED row")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--limit", type=int, default=500, help="first N items per zero-shot task (the stated limit)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--name", default="ft_alpaca")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args), default=str))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHOD_OPTIONS]
    if bad or not 0 < args.sparsity < 1:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(METHOD_OPTIONS)}" if bad else
                         f"--sparsity must be in (0, 1), got {args.sparsity}")
    from sparse_runtime.report import save_results

    WORK.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.out_dir) / f"{args.name}.json"
    rows = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []
    for what in ["base", *methods]:
        result = WORK / f"result-{what}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", what, "--result", str(result), "--model", args.model,
               "--sparsity", str(args.sparsity), "--device", args.device, "--tasks", args.tasks,
               "--limit", str(args.limit), "--threads", str(args.threads),
               *(["--steps", str(args.steps)] if args.steps else []), *(["--tf32"] if args.tf32 else []),
               *(["--data-dir", args.data_dir] if args.data_dir else [])]
        print(f"== {what}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT)
        if rc or not result.is_file():
            print(f"== {what} FAILED (exit {rc})", flush=True)
            continue
        row = row_of(json.loads(result.read_text()), time.perf_counter() - t0)
        if args.steps and what != "base":
            row["config"] += f" [REDUCED: {args.steps} steps]"
        rows = [r for r in rows if r["config"] != row["config"]] + [row]
        cols = ["config", "ppl (quick)", "zero-shot mean acc", "boolq", "rte", "hellaswag", "winogrande", "arc_easy",
                "arc_challenge", "openbookqa", "piqa", "steps", "train s", "peak train CUDA MB", "resurrected"]
        save_results(args.name, f"ft-alpaca repair: {args.model}, Wanda {args.sparsity:.0%}", rows,
                     protocol=f"ft-alpaca (one epoch of Alpaca 5k, 512 tokens, batch 8) + zero-shot (first "
                              f"{args.limit} items per task) + quick perplexity", model=args.model,
                     notes=[f"device {args.device}" + (", TF32 training" if args.tf32 else "") + "; base: Wanda, quick "
                            "calibration; each method's defaults except SEFT k = 10; merge verified exact",
                            "acc per task = lm-eval conventions (zeroshot_dense.md); a stated limit, not the full sets"],
                     columns=cols, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
