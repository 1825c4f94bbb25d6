"""SEFT vs masked LoRA at equal trainable parameters (rank 8 / its SEFT equivalent K = 8 (in+out))
on SmolLM2-135M pruned with Wanda at 50 %: peak training memory, step time, the share of the mask
that evolved in a short run, quick perplexity before/after merge, merged sparsity.

    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_seft.py

Memory: each method in a FRESH subprocess, peak RSS (getrusage ru_maxrss) minus the RSS after
loading the model and attaching the adapters, same batch x sequence in one micro-batch. The SEFT
process includes its gradient initialisation, a growth window (dense per-layer gradients) and an
evolution step, so its peak covers the expensive phases, not only plain steps. The bytes autograd
keeps for backward after one forward are reported too. NOT the full ft-quick (200 steps x 8 x 512
per configuration, about an hour each on the shared 2-core CPU): see the notes saved with the
results.
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
WORK = Path(os.environ.get("SR_BENCH_WORK", "/tmp/sr-bench-seft"))
RANK = 8


def pruned_base(sparsity: float = 0.5) -> Path:
    return wanda_base(WORK, sparsity)


def method_options(method: str, mem: bool) -> dict:
    if method == "masked-lora":
        return {"rank": RANK, "alpha": 2.0 * RANK}
    if mem:  # make the measured process go through init, a growth window and an evolution step
        return {"rank": RANK, "update_every": 2, "accumulation_steps": 1, "init_samples": 8}
    return {"rank": RANK}


def worker(method: str, base: str, batch: int, seqlen: int, steps: int, loss_chunk: int) -> dict:
    torch.set_num_threads(int(os.environ.get("SR_THREADS", "2")))
    from sparse_runtime.adapters import count_trainable
    from sparse_runtime.training import TrainConfig, Trainer, prepare_model

    cfg = TrainConfig(method=method, data="c4", steps=steps, batch_size=batch, micro_batch_size=batch, seq_len=seqlen,
                      lr=2e-4, loss_chunk_tokens=loss_chunk)
    lm, adapters, acfg, fp = prepare_model(base, method, method_options(method, True), seed=0)
    out = WORK / f"mem-{method}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tr = Trainer(lm.model, lm.tokenizer, lm.family, method, acfg, cfg, out, adapters=adapters, base_model=base,
                 fingerprint=fp)
    _, m = train_and_measure(tr, lm.model, out)
    evol = [cb.history for cb in tr.callbacks if hasattr(cb, "history")]
    return {"method": method, "trainable": count_trainable(lm.model), **m, "evolution": evol[0] if evol else None}


def run_worker(method, base, args) -> dict:
    return _run_worker(__file__, ["--worker", method, "--base", base, "--batch", args.batch, "--seqlen", args.seqlen,
                                  "--mem-steps", args.mem_steps, "--loss-chunk", args.loss_chunk])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=None)
    ap.add_argument("--base", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--mem-steps", type=int, default=3, help="steps per memory run (first is a warm-up)")
    ap.add_argument("--loss-chunk", type=int, default=1024)
    ap.add_argument("--ft-steps", type=int, default=30)
    ap.add_argument("--ft-batch", type=int, default=2)
    ap.add_argument("--ft-k", type=int, default=8, help="SEFT update_every in the short run")
    ap.add_argument("--ft-acc", type=int, default=3, help="SEFT accumulation_steps in the short run")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.base, args.batch, args.seqlen, args.mem_steps, args.loss_chunk)))
        return

    import sparse_runtime as sr
    from sparse_runtime.eval.perplexity import wikitext2_perplexity
    from sparse_runtime.merge import merge_adapter_dir
    from sparse_runtime.report import save_results
    from sparse_runtime.training import TrainConfig, finetune

    os.environ.setdefault("SPARSE_RUNTIME_DATA", "/work/shared/data")
    os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")
    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    base = pruned_base(0.5)
    prune_s = time.perf_counter() - t_all
    mem = {}
    for method in ("masked-lora", "seft"):
        t0 = time.perf_counter()
        mem[method] = run_worker(method, base, args)
        print(f"{method}: {json.dumps({k: v for k, v in mem[method].items() if k != 'losses'})} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    mem_s = time.perf_counter() - t_all - prune_s
    ref = mem["masked-lora"]
    rows = []
    for method, r in mem.items():
        rows.append({"config": f"{method} (rank {RANK} equiv.)", "phase": "memory", "batch x seq":
                     f"{args.batch} x {args.seqlen}", "trainable params": r["trainable"],
                     "peak RSS MB": r["peak_rss_mb"], "train peak delta MB": r["train_peak_delta_mb"],
                     "peak delta / masked-lora": r["train_peak_delta_mb"] / ref["train_peak_delta_mb"],
                     "saved for backward MB": r["saved_for_backward_mb"],
                     "step s (median)": r["step_s_median"]})
    # short runs: quick ppl of the adapter model and the merged checkpoint
    t0 = time.perf_counter()
    pr = sr.load_model(base)
    ppl_pruned = wikitext2_perplexity(pr.model, pr.tokenizer, "quick").ppl
    base_man = pr.manifest
    del pr
    rows.append({"config": "pruned 50% (wanda, quick calibration)", "phase": "before fine-tuning",
                 "ppl before merge": ppl_pruned, "merged sparsity": base_man.total_measured})
    short = {}
    for method in ("masked-lora", "seft"):
        opts = method_options(method, False)
        if method == "seft":
            opts.update(update_every=args.ft_k, accumulation_steps=args.ft_acc, init_samples=8)
        cfg = TrainConfig(method=method, data="c4", steps=args.ft_steps, batch_size=args.ft_batch, seq_len=args.seqlen,
                          loss_chunk_tokens=args.loss_chunk)
        t1 = time.perf_counter()
        res, lm = finetune(base, WORK / f"ft-{method}", cfg, opts, overwrite=True)
        ppl_adapter = wikitext2_perplexity(lm.model, lm.tokenizer, "quick").ppl
        del lm
        merged, rep = merge_adapter_dir(WORK / f"ft-{method}", WORK / f"ft-{method}-merged", overwrite=True)
        mm = sr.load_model(merged)
        ppl_merged = wikitext2_perplexity(mm.model, mm.tokenizer, "quick").ppl
        man = mm.manifest
        del mm
        d = rep.as_dict()
        evo = d.get("mask_evolution", {})
        resurrected = sum(v["resurrected"] for v in evo.values())
        newly = sum(v["newly_pruned"] for v in evo.values())
        nnz = sum(r.nnz for r in base_man.layers.values())
        log = [json.loads(l) for l in (WORK / f"ft-{method}" / "train_log.jsonl").read_text().splitlines()]
        steps_s = [r["step_s"] for r in log if "step_s" in r][1:]
        state = json.loads(sorted((WORK / f"ft-{method}" / "checkpoints").glob("step-*"))[-1]
                           .joinpath("trainer_state.json").read_text())
        short[method] = {"losses": res.losses, "merge": d, "evolution": (state.get("callbacks") or [{}])[0],
                         "seconds": res.seconds}
        rows.append({"config": f"{method} (rank {RANK} equiv.)", "phase": f"{args.ft_steps}-step run",
                     "batch x seq": f"{args.ft_batch} x {args.seqlen}", "trainable params": res.trainable_parameters,
                     "step s (median)": statistics.median(steps_s), "ppl before merge": ppl_adapter,
                     "ppl after merge": ppl_merged, "merged sparsity": man.total_measured,
                     "mask evolved (resurrected / kept)": resurrected / nnz if method == "seft" else 0.0,
                     "resurrected": resurrected, "newly pruned": newly,
                     "loss first/last": f"{res.losses[0]:.3f}/{res.losses[-1]:.3f}"})
        print(json.dumps(rows[-1]), f"({time.perf_counter() - t1:.0f} s)", flush=True)
    ft_s = time.perf_counter() - t0
    ratio = mem["seft"]["train_peak_delta_mb"] / ref["train_peak_delta_mb"]
    ratio_saved = mem["seft"]["saved_for_backward_mb"] / ref["saved_for_backward_mb"]
    evol = short["seft"]["evolution"].get("history", [])
    notes = [
        "NOT the ft-quick comparison (200 x 8 x 512 per configuration; SEFT beside masked LoRA, LoRS and dense LoRA at "
        "Wanda 50 %, 70 % and 2:4: ft_quick.md, measured on a GPU) nor the ft-alpaca run (bench_ft_alpaca.py). "
        "Measured here: memory and step time at equal trainable parameters on this CPU, alone, and a short run of "
        "each method.",
        f"base: SmolLM2-135M-Instruct, Wanda 50 % unstructured (quick calibration 32 x 512 C4, seed 0), measured "
        f"block sparsity {base_man.total_measured:.6f}.",
        f"equal trainable parameters: masked LoRA rank {RANK} (alpha {2 * RANK}) on q/k/v/o/gate/up/down; SEFT "
        f"K = {RANK}*(in+out) deltas per layer (identical count: {mem['seft']['trainable']} vs "
        f"{ref['trainable']}).",
        f"memory runs: fp32, batch {args.batch} x {args.seqlen} in one micro-batch, {args.mem_steps} steps (first = "
        "warm-up, excluded from the median step time), no gradient checkpointing, LM-head loss in checkpointed chunks "
        f"of {args.loss_chunk} tokens (both), C4 windows seed 1. The SEFT process runs its gradient initialisation "
        "(8 examples), a growth window (dense per-layer gradients, k=2, 1 accumulation step) and an evolution step "
        "inside the measured process, so its peak covers them. Masked LoRA stores its mask (SQFT-style).",
        "peak memory method: a fresh subprocess per method; 'train peak delta' = getrusage ru_maxrss minus VmRSS "
        "after loading the model and attaching adapters; 'saved for backward' = bytes autograd keeps after one "
        "forward (saved_tensors_hooks; parameters and buffers excluded).",
        f"SEFT / masked LoRA: train-peak-delta ratio {ratio:.3f} (acceptance: <= 1), saved-for-backward ratio "
        f"{ratio_saved:.3f}.",
        f"short runs: {args.ft_steps} steps x {args.ft_batch} x {args.seqlen} tokens (batch {args.ft_batch} to fit "
        "the time budget), each method's default lr/schedule (2e-4 linear, 3 % warmup, both); SEFT k = "
        f"{args.ft_k} (paper: 60 for perplexity recovery over a much longer run), accumulation {args.ft_acc} steps, "
        "p0 0.2 cosine, gradient init from 8 examples, layer scope, resurrection on; evolution steps: "
        f"{json.dumps(evol)}.",
        "mask evolved = weights resurrected (kept now, pruned in the base) / kept weights; the same number were "
        "newly pruned (layer scope keeps each layer's count).",
        f"wall times: pruning {prune_s:.0f} s, memory runs {mem_s:.0f} s, short runs + perplexities {ft_s:.0f} s, "
        f"total {time.perf_counter() - t_all:.0f} s.",
    ]
    save_results("seft", "SEFT vs masked LoRA at equal trainable parameters: memory, step time, evolved mask, "
                 "perplexity before/after merge", rows,
                 protocol="quick perplexity (WikiText-2, 40 x 512); custom short fine-tune budget (not ft-quick)",
                 model="SmolLM2-135M-Instruct (fp32), Wanda 50 %", notes=notes,
                 out_dir=ROOT / "benchmarks" / "results", extra={"memory_runs": mem, "short_runs": short})


if __name__ == "__main__":
    main()
