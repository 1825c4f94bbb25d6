"""Fine-tuning memory and speed: masked LoRA vs LoRS vs dense LoRA on SmolLM2-135M pruned at 50 %,
plus a short LoRS fine-tune with quick perplexity before/after merge.

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_finetune.py

Each method's memory is measured in a FRESH subprocess (peak RSS from getrusage, minus the RSS
after loading the model and attaching adapters), on the same batch/sequence length, rank and
options; the bytes autograd keeps for backward in one forward (saved-tensor hooks, excluding
parameters and buffers) are reported beside it, because RSS also holds allocator slack.
This is NOT the full ``ft-quick`` comparison (200 steps x 8 x 512 per configuration, about an hour
each on a 2-core CPU): see the notes written with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from _common import run_worker as _run_worker, train_and_measure, wanda_base

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("SR_BENCH_WORK", "/tmp/sr-bench-finetune"))
RANK = 8


def pruned_base(sparsity: float = 0.5) -> tuple[Path, str]:
    return wanda_base(WORK, sparsity), "wanda"


def worker(method: str, base: str, batch: int, seqlen: int, steps: int, loss_chunk: int, gc: bool = False) -> dict:
    """Runs in a fresh process: attach, train ``steps`` steps (first = warm-up), report."""
    torch.set_num_threads(int(os.environ.get("SR_THREADS", "2")))
    from sparse_runtime.adapters import count_trainable
    from sparse_runtime.training import TrainConfig, Trainer, prepare_model

    cfg = TrainConfig(method=method, data="c4", steps=steps, batch_size=batch, micro_batch_size=batch, seq_len=seqlen,
                      lr=1e-4, loss_chunk_tokens=loss_chunk, max_grad_norm=1.0, gradient_checkpointing=gc)
    opts = {"rank": RANK, "alpha": 2.0 * RANK, "scaling": "lora", "init": "kaiming"}
    lm, adapters, acfg, fp = prepare_model(base, method, opts, seed=0)
    out = WORK / f"run-{method}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tr = Trainer(lm.model, lm.tokenizer, lm.family, method, acfg, cfg, out, adapters=adapters, base_model=base,
                 fingerprint=fp)
    _, m = train_and_measure(tr, lm.model, out)
    return {"method": method, "trainable": count_trainable(lm.model), **m}


def run_worker(method, base, args) -> dict:
    return _run_worker(__file__, ["--worker", method, "--base", base, "--batch", args.batch, "--seqlen", args.seqlen,
                                  "--mem-steps", args.mem_steps, "--loss-chunk", args.loss_chunk,
                                  *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])])


def short_lors_finetune(args, base, pruner: str, rows: list) -> list[str]:
    """A short LoRS fine-tune with quick perplexity dense / pruned / adapter (before merge) / merged;
    appends its rows, returns its notes."""
    import sparse_runtime as sr
    from sparse_runtime.eval.perplexity import wikitext2_perplexity
    from sparse_runtime.merge import merge_adapter_dir
    from sparse_runtime.training import TrainConfig, finetune

    t0 = time.perf_counter()
    dense = sr.load_model("smollm2-135m")
    ppl_dense = wikitext2_perplexity(dense.model, dense.tokenizer, "quick").ppl
    del dense
    pr = sr.load_model(base)
    ppl_pruned = wikitext2_perplexity(pr.model, pr.tokenizer, "quick").ppl
    del pr
    cfg = TrainConfig(method="lors", data="c4", steps=args.ft_steps, batch_size=args.ft_batch, seq_len=args.seqlen,
                      lr=args.ft_lr, schedule="cosine", min_lr=1e-6, loss_chunk_tokens=args.loss_chunk)
    res, lm = finetune(base, WORK / "lors-ft", cfg, {"rank": RANK, "init_samples": args.init_samples}, overwrite=True)
    ppl_adapter = wikitext2_perplexity(lm.model, lm.tokenizer, "quick").ppl
    del lm
    merged, rep = merge_adapter_dir(WORK / "lors-ft", WORK / "lors-ft-merged", overwrite=True)
    mm = sr.load_model(merged)
    ppl_merged = wikitext2_perplexity(mm.model, mm.tokenizer, "quick").ppl
    ft_s = time.perf_counter() - t0
    base_man = sr.read_manifest(base)
    rows += [
        {"config": "dense (unpruned)", "ppl": ppl_dense},
        {"config": f"pruned 50% ({pruner})", "ppl": ppl_pruned},
        {"config": f"lors {args.ft_steps} steps, adapter (before merge)", "batch x seq": f"{args.ft_batch} x {args.seqlen}",
         "trainable params": res.trainable_parameters, "step s (median)": statistics.median(
             [json.loads(l)["step_s"] for l in (WORK / "lors-ft" / "train_log.jsonl").read_text().splitlines()]),
         "ppl": ppl_adapter},
        {"config": f"lors {args.ft_steps} steps, merged", "ppl": ppl_merged},
    ]
    return [
        f"merged block sparsity {sr.read_manifest(merged).total_measured:.6f} vs base "
        f"{base_man.total_measured:.6f}; merge: {json.dumps(rep.as_dict())}",
        f"LoRS fine-tune: {args.ft_steps} steps x {args.ft_batch} x {args.seqlen} tokens (batch 4 to fit the time "
        f"budget), lr {args.ft_lr} cosine to 1e-6 (the official 2e-5 is for 3 epochs of 7B SFT), rank {RANK}, "
        f"alpha = r (official c = alpha/sqrt(r)), gradient-SVD init from {args.init_samples} examples (official: "
        f"128), exact masked gradient; losses first/last {res.losses[0]:.4f}/{res.losses[-1]:.4f}; fine-tune + 4 "
        f"perplexities {ft_s:.0f} s.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=None)
    ap.add_argument("--base", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--mem-steps", type=int, default=4, help="steps per memory run (first is warm-up)")
    ap.add_argument("--loss-chunk", type=int, default=1024)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="memory runs with activation checkpointing: activations shrink to block inputs, so the "
                         "weight-sized tensors each method keeps (where LoRS saves) dominate the peak")
    ap.add_argument("--name", default="finetune_memory")
    ap.add_argument("--ft-steps", type=int, default=20, help="steps of the short LoRS run (0: memory runs only)")
    ap.add_argument("--ft-batch", type=int, default=4)
    ap.add_argument("--ft-lr", type=float, default=2e-4)
    ap.add_argument("--init-samples", type=int, default=8)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.base, args.batch, args.seqlen, args.mem_steps, args.loss_chunk,
                                args.gradient_checkpointing)))
        return

    import sparse_runtime as sr
    from sparse_runtime.report import save_results

    os.environ.setdefault("SPARSE_RUNTIME_DATA", "/work/shared/data")
    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    base, pruner = pruned_base(0.5)
    prune_s = time.perf_counter() - t0
    rows = []
    mem = {}
    for method in ("masked-lora", "lors", "dense-lora"):
        t0 = time.perf_counter()
        r = run_worker(method, base, args)
        mem[method] = r
        print(f"{method}: {json.dumps(r)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    ref = mem["masked-lora"]
    for method, r in mem.items():
        rows.append({"config": f"{method} r={RANK}", "batch x seq": f"{args.batch} x {args.seqlen}",
                     "trainable params": r["trainable"], "peak RSS MB": r["peak_rss_mb"],
                     "train peak delta MB": r["train_peak_delta_mb"],
                     "delta / masked-lora": r["train_peak_delta_mb"] / ref["train_peak_delta_mb"],
                     "saved for backward MB": r["saved_for_backward_mb"],
                     "saved / masked-lora": r["saved_for_backward_mb"] / ref["saved_for_backward_mb"],
                     "step s (median)": r["step_s_median"], "ppl": None})
    ft_notes: list[str] = []
    if args.ft_steps > 0:
        ft_notes = short_lors_finetune(args, base, pruner, rows)
    ratio_peak = mem["lors"]["train_peak_delta_mb"] / ref["train_peak_delta_mb"]
    ratio_saved = mem["lors"]["saved_for_backward_mb"] / ref["saved_for_backward_mb"]
    notes = [
        "NOT the full ft-quick comparison (200 optimiser steps x 8 x 512 tokens per configuration: at the step "
        f"times measured here, {200 * min(r['step_s_median'] for r in mem.values()) / 3600:.1f}-"
        f"{200 * max(r['step_s_median'] for r in mem.values()) / 3600:.1f} h each on this 2-core CPU; that table is "
        "benchmarks/bench_ft_quick.py, results in ft_quick.md). Measured here: memory and step time of the three "
        "methods at equal rank and batch" + (", and a short LoRS fine-tune." if args.ft_steps > 0 else "."),
        f"base: SmolLM2-135M-Instruct pruned to 50% unstructured with {pruner} (quick calibration: 32 x 512 C4, "
        f"seed 0), block sparsity {sr.read_manifest(base).total_measured:.6f}",
        f"memory runs: fp32, rank {RANK} on q/k/v/o/gate/up/down, alpha {2 * RANK} (s = alpha/r for all three, "
        "equal trainable parameters), kaiming init (no gradient-SVD pass in the measured process), batch "
        f"{args.batch} x {args.seqlen} in one micro-batch, "
        f"{'gradient checkpointing' if args.gradient_checkpointing else 'no gradient checkpointing'}, sdpa attention, LM-head loss "
        f"in checkpointed chunks of {args.loss_chunk} tokens (same for all), C4 windows seed 1, "
        f"{args.mem_steps} steps of which the first is a warm-up; masked LoRA stores its mask (SQFT-style), "
        "LoRS recomputes it; LoRS grad_mode exact.",
        "peak memory method: a fresh subprocess per method; 'train peak delta' = getrusage ru_maxrss minus VmRSS "
        "after loading the model and attaching adapters; 'saved for backward' = bytes of the tensors autograd keeps "
        "after one forward (saved_tensors_hooks, parameters and buffers excluded).",
        f"LoRS / masked LoRA: train-peak-delta ratio {ratio_peak:.3f}, saved-for-backward ratio {ratio_saved:.3f}.",
        *ft_notes,
        f"wall times: pruning {prune_s:.0f} s, total {time.perf_counter() - t_all:.0f} s.",
    ]
    save_results(args.name, "Sparse fine-tuning: memory and step time (masked LoRA, LoRS, dense LoRA)"
                 + (" and a short LoRS run" if args.ft_steps > 0 else f", batch {args.batch} x {args.seqlen}"), rows, protocol="quick perplexity (WikiText-2, 40 x 512); custom fine-tune "
                 "budget (not ft-quick)", model="SmolLM2-135M-Instruct (fp32)", notes=notes,
                 out_dir=ROOT / "benchmarks" / "results", extra={"memory_runs": mem})


if __name__ == "__main__":
    main()
