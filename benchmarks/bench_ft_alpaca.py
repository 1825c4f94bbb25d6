"""The ``ft-alpaca`` repair run (docs/protocols.md#ft-alpaca): one epoch of the 5,000 Alpaca records (prompt template,
loss on the response only, 512 tokens) on SmolLM2-135M pruned by Wanda, then the zero-shot suite
(first N items per task: a stated limit) and WikiText-2 ``quick`` perplexity, before and after.

    python benchmarks/bench_ft_alpaca.py --device cuda --tf32 --jobs 2 --eval-batch 32   # SEFT at 70 % (issue 7)
    python benchmarks/bench_ft_alpaca.py --methods seft,masked-lora --sparsity 0.5
    python benchmarks/bench_ft_alpaca.py ... --resume        # after an interruption: continue, redo nothing

One epoch is 625 optimiser steps of 8 sequences: hours on a 2-core CPU, minutes on a GPU. Phases:
the base is pruned once (quick calibration, on ``--device``) into ``$SR_BENCH_WORK/ft-alpaca``; then
the base's evaluation and each method (train, merge with exact sparsity verified by the merge,
evaluate) run as fresh processes, so each one's memory figures are its own. ``--jobs 2`` runs the
base's evaluation beside the first method's training (worth it on a GPU, where neither fills the
device; the figures do not change, only the step times are then shared). SEFT uses k = 10 (the
paper's commonsense setting, docs/methods.md#seft-setup); every other option is the method's default.

Interruptions (a device lent for minutes, a killed job): every finished phase leaves its result
under the work directory, keyed by the settings it depends on, and training writes a resumable
checkpoint every ``--save-every`` steps. ``--resume`` reuses finished phases with the same key and
continues a training from its last checkpoint (the engine checks that the run's identity matches
and the resumed loss curve is the uninterrupted one: tests/test_training.py). Rows are merged
into ``benchmarks/results/<name>.{md,json}`` as each phase finishes.
"""
from __future__ import annotations

import argparse
import hashlib
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
EPOCH_STEPS = 625  # 5,000 records / 8 (4,998 have a response that survives truncation: the last step has 6)
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "seft": {"update_every": 10},  # SEFT's commonsense / instruction setting (k = 10)
    "masked-lora": {},
    "lors": {},
    "dense-lora": {},
}
COLUMNS = ["config", "ppl (quick)", "zero-shot mean acc", "boolq", "rte", "hellaswag", "winogrande", "arc_easy",
           "arc_challenge", "openbookqa", "piqa", "steps", "train s", "peak train CUDA MB", "resurrected",
           "mask evolved"]


def device_kind(args) -> str:
    return "cpu" if args.device == "cpu" else "cuda"


def base_dir(args) -> Path:
    """The pruned base; pruned on ``--device`` (a GPU sums the calibration statistics in another
    order, so its masks differ at near-ties from the CPU's), hence one directory per device kind."""
    return WORK / f"base-wanda-{int(round(args.sparsity * 100))}-{device_kind(args)}"


def phase_key(args, what: str) -> str:
    """What a phase's result depends on; ``--resume`` reuses a result only under the same key."""
    fields: dict[str, Any] = {"model": args.model, "sparsity": args.sparsity, "device": args.device,
                              "tasks": args.tasks, "limit": args.limit, "eval_batch": args.eval_batch}
    if what != "base":
        fields.update(method=what, steps=args.steps, tf32=bool(args.tf32), options=METHOD_OPTIONS[what])
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def result_path(args, what: str) -> Path:
    return WORK / f"result-{what}-{phase_key(args, what)}.json"


def _eval(model_dir: str, args) -> dict[str, Any]:
    import sparse_runtime as sr
    from sparse_runtime.eval.zeroshot import evaluate_zeroshot

    lm = sr.load_model(model_dir)
    if args.device != "cpu":
        lm.model.to(args.device)
    p = sr.wikitext2_perplexity(lm.model, lm.tokenizer, "quick", args.data_dir)
    z = evaluate_zeroshot(lm.model, lm.tokenizer, tasks=args.tasks, limit=args.limit, batch_size=args.eval_batch,
                          data_dir=args.data_dir)
    return {"ppl": p.ppl, "zeroshot": z.as_dict()}


def prune_base(args) -> Path:
    import sparse_runtime as sr

    base = base_dir(args)
    if not (base / "sparsity_manifest.json").is_file():
        cfg = sr.PruneConfig(method="wanda", sparsity=args.sparsity, protocol="quick",
                             device=None if args.device == "cpu" else args.device)
        sr.prune_checkpoint(args.model, cfg, base, overwrite=True, data_dir=args.data_dir, plot=False)
    return base


def worker(args) -> dict[str, Any]:
    """One phase in this (fresh) process: ``prune``, ``base`` (evaluate the pruned base) or a
    method (train, merge, evaluate)."""
    import torch

    torch.set_num_threads(args.threads)
    base = base_dir(args)
    label = f"wanda-{int(round(args.sparsity * 100))}"
    if args.worker == "prune":
        return {"base": str(prune_base(args))}
    if args.worker == "base":
        return {"config": f"{label} (no fine-tuning)", **_eval(str(base), args)}
    from sparse_runtime.merge import merge_adapter_dir
    from sparse_runtime.training import TrainConfig, finetune
    from sparse_runtime.training.checkpoint import latest_checkpoint

    method = args.worker
    run = WORK / f"{method}-{base.name}-{phase_key(args, method)}"
    tc = TrainConfig(method=method, data="alpaca", seq_len=512, batch_size=8, steps=args.steps, seed=0,
                     loss_chunk_tokens=1024, save_every=args.save_every)
    resume = bool(args.resume and latest_checkpoint(run / "adapter") is not None)
    t0 = time.perf_counter()
    with tf32_training(args.tf32):  # evaluation stays full fp32
        res, lm = finetune(str(base), run / "adapter", tc, dict(METHOD_OPTIONS[method]), data_dir=args.data_dir,
                           overwrite=not resume, resume=resume, device=None if args.device == "cpu" else args.device)
    train_s = time.perf_counter() - t0
    del lm
    merged, rep = merge_adapter_dir(run / "adapter", run / "merged", overwrite=True, data_dir=args.data_dir)
    out = {"config": f"{method} @ {label}", "steps": res.steps, "tokens": res.tokens,
           "trainable": res.trainable_parameters, "train_s": train_s, "peak_train_cuda_mb": res.peak_device_mb,
           "peak_train_rss_mb": res.peak_rss_mb, "final_loss": res.losses[-1] if res.losses else None,
           "resumed_from": res.resumed_from, "merge": rep.as_dict(), "tf32_training": bool(args.tf32),
           **_eval(str(merged), args)}
    ev = rep.as_dict().get("mask_evolution") or {}
    if ev:
        kept = sum(v["nnz"] for v in json.loads((base / "sparsity_manifest.json").read_text())["layers"].values())
        out["resurrected"] = sum(v["resurrected"] for v in ev.values())
        out["mask_evolved"] = out["resurrected"] / kept  # ft_quick.md's definition: of the base's kept weights
    return out


def row_of(res: dict[str, Any], wall: float) -> dict[str, Any]:
    z = res["zeroshot"]
    row = {"config": res["config"], "ppl (quick)": res["ppl"], "zero-shot mean acc": z["mean_acc"]}
    row.update({r["task"]: r["acc"] for r in z["rows"]})
    row.update({"steps": res.get("steps"), "train s": res.get("train_s"),
                "peak train CUDA MB": res.get("peak_train_cuda_mb"), "resurrected": res.get("resurrected"),
                "mask evolved": res.get("mask_evolved"),
                "wall s": wall, "detail": res})
    return row


def worker_cmd(args, what: str, result: Path) -> list[str]:
    return [sys.executable, __file__, "--worker", what, "--result", str(result), "--model", args.model,
            "--sparsity", str(args.sparsity), "--device", args.device, "--tasks", args.tasks,
            "--limit", str(args.limit), "--threads", str(args.threads), "--eval-batch", str(args.eval_batch),
            "--save-every", str(args.save_every),
            *(["--steps", str(args.steps)] if args.steps else []), *(["--tf32"] if args.tf32 else []),
            *(["--resume"] if args.resume else []), *(["--data-dir", args.data_dir] if args.data_dir else [])]


def save_table(args, rows: list[dict[str, Any]]) -> None:
    from sparse_runtime.report import save_results

    budget = ("one epoch of Alpaca 5k" if not args.steps else
              f"REDUCED: {args.steps} of the epoch's {EPOCH_STEPS} steps, the first {8 * args.steps} records of the "
              "seed-0 order; the method's schedule runs over these steps")
    save_results(args.name, f"ft-alpaca repair: {args.model}, Wanda {args.sparsity:.0%}", rows,
                 protocol=f"ft-alpaca ({budget}, 512 tokens, batch 8) + zero-shot (first {args.limit} items per "
                          "task) + quick perplexity", model=args.model,
                 notes=[f"device {args.device}" + (", TF32 training" if args.tf32 else "") + "; base: Wanda, quick "
                        f"calibration, pruned on {device_kind(args)}; each method's defaults "
                        "except SEFT k = 10; merge verified exact",
                        f"acc per task = lm-eval conventions (zeroshot_dense.md), zero-shot batch {args.eval_batch}; "
                        "a stated limit, not the full sets",
                        f"phases run {args.jobs} at a time" + (" (base evaluation beside training: step times "
                                                               "shared)" if args.jobs > 1 else "")
                        + "; a row whose detail has resumed_from trained across invocations (train s and the "
                          "CUDA peak are then the last invocation's)"],
                 columns=COLUMNS, out_dir=args.out_dir)


def run_phases(args, phases: list[str]) -> None:
    """Run ``phases`` as fresh processes, ``args.jobs`` at a time, merging each finished row into the table."""
    out_json = Path(args.out_dir) / f"{args.name}.json"
    rows = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []
    pending, running = list(phases), {}
    while pending or running:
        while pending and len(running) < args.jobs:
            what = pending.pop(0)
            result = result_path(args, what)
            if args.resume and result.is_file():
                print(f"== {what}: reusing {result.name} (--resume)", flush=True)
                res, wall = json.loads(result.read_text()), None
                rows = merge_row(args, rows, what, res, wall)
                continue
            result.unlink(missing_ok=True)
            print(f"== {what}", flush=True)
            running[what] = (subprocess.Popen(worker_cmd(args, what, result), cwd=ROOT), time.perf_counter(), result)
        for what, (proc, t0, result) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[what]
            if proc.returncode or not result.is_file():
                print(f"== {what} FAILED (exit {proc.returncode}); --resume continues from its last checkpoint",
                      flush=True)
                continue
            rows = merge_row(args, rows, what, json.loads(result.read_text()), time.perf_counter() - t0)
        time.sleep(0.5)


def merge_row(args, rows: list[dict[str, Any]], what: str, res: dict[str, Any], wall) -> list[dict[str, Any]]:
    row = row_of(res, wall)
    if args.steps and what != "base":
        row["config"] += f" [REDUCED: {args.steps} steps]"
    rows = [r for r in rows if r["config"] != row["config"]] + [row]
    save_table(args, rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--methods", default="seft", help=f"comma list of {', '.join(METHOD_OPTIONS)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls while training on a GPU (evaluation stays fp32)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"default: one epoch ({EPOCH_STEPS} steps); fewer = a REDUCED row")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--limit", type=int, default=500, help="first N items per zero-shot task (the stated limit)")
    ap.add_argument("--eval-batch", type=int, default=8,
                    help="zero-shot batch (32 or more on a GPU; results equal up to float rounding)")
    ap.add_argument("--jobs", type=int, default=1, help="phases at a time after pruning (2 on a GPU: the base's "
                                                        "evaluation beside the first training)")
    ap.add_argument("--save-every", type=int, default=50, help="optimiser steps between resumable checkpoints")
    ap.add_argument("--resume", action="store_true",
                    help="reuse finished phases with the same settings and continue interrupted trainings")
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
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(METHOD_OPTIONS)}")
    if not 0 < args.sparsity < 1:
        raise SystemExit(f"--sparsity must be in (0, 1), got {args.sparsity}")
    for flag, val in (("--jobs", args.jobs), ("--eval-batch", args.eval_batch), ("--save-every", args.save_every)):
        if val < 1:
            raise SystemExit(f"{flag} must be >= 1, got {val}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1 (or left out for one epoch), got {args.steps}")
    WORK.mkdir(parents=True, exist_ok=True)
    print("== prune", flush=True)  # every later phase needs the base: first, alone
    result = WORK / f"result-prune-{base_dir(args).name}.json"
    if subprocess.call(worker_cmd(args, "prune", result), cwd=ROOT) or not result.is_file():
        raise SystemExit("== prune FAILED: nothing else can run without the pruned base")
    run_phases(args, ["base", *methods])


if __name__ == "__main__":
    main()
