"""The fused repair table (issue #23), resumable: allocation -> one-shot -> DSnoT -> fine-tuning repair
(with or without distillation from the dense model) -> exact merge, with every stage's perplexity.

    python benchmarks/bench_fused.py --dry-run                                  # plan, status, cost
    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_fused.py --only 'atp-sparsegpt-70+dsnot+seft+kd-both'
    python benchmarks/bench_fused.py --only tier1              # the configurations that decide the table
    python benchmarks/bench_fused.py --device cuda --tf32 --jobs 8 --only all   # a GPU: minutes
    # smoke (tiny model, a minute or two; rows flagged REDUCED, in their own table, never the real one):
    python benchmarks/bench_fused.py --model tiny-llama --protocol test --steps 2 --batch 2 --seq-len 32 \\
        --only 'atp-sparsegpt-50+dsnot+seft+kd-both' --out-dir /tmp/fused-smoke

Protocol (``docs/protocols.md#ft-quick``, as ``bench_ft_quick.py``): every fine-tuning is 200 steps x 8
C4 windows of 512 tokens (data seed 1), rank 8 or its parameter equivalent, each method's own learning
rate and schedule; quality = WikiText-2 ``quick`` perplexity after each stage: the dense model, the
one-shot base (allocation + pruning, ``quick`` calibration), the base + DSnoT, and the merged
fine-tuned checkpoint, whose per-layer nonzero counts (and N:M) are verified against the DSnoT base.

A configuration is ``BASE+dsnot+METHOD[+kd-MODE]``: BASE = ``ALLOC-PRUNER-TARGET`` (ALLOC uniform | owl
| atp, PRUNER wanda | sparsegpt, TARGET 50 | 70) or ``PRUNER-2:4``; METHOD a fine-tuning method
(seft, masked-lora, lors); MODE the distillation (logits | blocks | both; none without the suffix;
weight 0.5, temperature 1, the dense model the base was pruned from as the teacher:
docs/finetuning.md#distillation). ``--only`` (alias of ``--configs``) takes names, shell patterns,
``tier1`` / ``tier2`` / ``tier3`` (the priority order: tier 1 decides the table: the candidate base of
each sparsity with SEFT and every distillation mode; tier 2 the other fine-tuning methods; tier 3 the
other bases), ``missing`` or ``all``.

Bases (one-shot and DSnoT checkpoints with their perplexities) are prepared once in their own worker
process and cached in ``$SR_BENCH_WORK`` (default /tmp/sr-bench-fused), shared by every configuration;
each configuration trains, merges and evaluates in a fresh process (its peak RSS is its own) with
resumable training checkpoints every ``--save-every`` steps; the table
``benchmarks/results/fused_quick.{md,json}`` is rewritten after every configuration. ``--steps``,
``--batch``, ``--seq-len`` below the ft-quick budget give rows flagged REDUCED.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

from _common import tf32_training  # the script's folder is on sys.path
from _scheduler import WorkDir, model_slug, run_queue, select_names, slug, spawn_worker, write_json
import bench_ft_quick
from bench_ft_quick import (FT_QUICK, PRIOR, RANK, Budget, _on_device, _peak_device_mb, _peak_mb, _ppl, add_run_arguments,
                            budget_of, check_run_arguments,
                            eq_text, lr_text, machine_short, model_params, read_log, row_key, sparsity_check,
                            step_stats)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = "/tmp/sr-bench-fused"
DISTILL_WEIGHT, DISTILL_T = 0.5, 1.0

# ---------------------------------------------------------------------------------------------
# the registry
BASES: dict[str, dict[str, Any]] = {}
for _t in (50, 70):
    for _alloc in ("atp", "owl", "uniform"):
        for _m in ("sparsegpt", "wanda"):
            BASES[f"{_alloc}-{_m}-{_t}"] = dict(method=_m, sparsity=_t / 100, allocation=_alloc)
for _m in ("sparsegpt", "wanda"):
    BASES[f"{_m}-2:4"] = dict(method=_m, structure="2:4")

# the candidate base of each sparsity (each stage the best of its kind measured alone: SparseGPT the best
# one-shot in pruning_quick.md, ATP the best allocation at 70 %; 2:4 has no allocation)
CANDIDATE = {"50": "atp-sparsegpt-50", "70": "atp-sparsegpt-70", "2:4": "sparsegpt-2:4"}
METHODS = ("seft", "masked-lora", "lors")
MODES = ("none", "logits", "blocks", "both")


@dataclass
class Config:
    name: str
    base: str
    method: str
    distill: str
    tier: int
    about: str


def config_name(base: str, method: str, distill: str) -> str:
    return f"{base}+dsnot+{method}" + ("" if distill == "none" else f"+kd-{distill}")


def _registry() -> dict[str, Config]:
    reg: dict[str, Config] = {}

    def add(base: str, method: str, distill: str, tier: int) -> None:
        name = config_name(base, method, distill)
        if name not in reg:
            kd = "no distillation" if distill == "none" else f"distillation: {distill}"
            reg[name] = Config(name, base, method, distill, tier, f"{base} -> DSnoT -> {method} ({kd}) -> merge")

    for base in CANDIDATE.values():  # tier 1: what decides the table
        for mode in MODES:
            add(base, "seft", mode, 1)
    for base in CANDIDATE.values():  # tier 2: the other fine-tuning methods, without and with both terms
        for method in METHODS[1:]:
            for mode in ("none", "both"):
                add(base, method, mode, 2)
    for base in BASES:  # tier 3: the other bases, SEFT with both terms
        add(base, "seft", "both", 3)
    return reg


CONFIGS: dict[str, Config] = _registry()


class Work(WorkDir):
    """``$SR_BENCH_WORK/<model>-<protocol>/``: bases/<base>/{oneshot,dsnot}, bases/<base>.json, runs/."""

    def __init__(self, model: str, protocol: str) -> None:
        super().__init__(Path(os.environ.get("SR_BENCH_WORK", DEFAULT_WORK)) / f"{model_slug(model)}-{slug(protocol)}")

    def base_dir(self, base: str, stage: str) -> Path:
        return self.root / "bases" / slug(base) / stage

    def info_path(self, base: str) -> Path:
        return self.root / "bases" / f"{slug(base)}.json"

    def info(self, base: str) -> Optional[dict[str, Any]]:
        p = self.info_path(base)
        if not p.is_file():
            return None
        info = json.loads(p.read_text())
        if base != "dense" and not (self.base_dir(base, "dsnot") / "sparsity_manifest.json").is_file():
            return None
        return info

    def run_dir(self, cfg: Config, budget: Budget) -> Path:
        return self.root / "runs" / slug(f"{cfg.name}-{budget.tag}")


# ---------------------------------------------------------------------------------------------
# workers (each in a fresh process)
def worker_dense(args) -> dict[str, Any]:
    import sparse_runtime as sr

    p = _ppl(_on_device(sr.load_model(args.model), args), args)
    info = {"base": "dense", "ppl": p["ppl"], "ppl_s": p["seconds"], "model": args.model, "protocol": args.protocol}
    write_json(Work(args.model, args.protocol).info_path("dense"), info)
    return info


def worker_base(args) -> dict[str, Any]:
    """One-shot base (allocation + pruning) and its DSnoT repair, each with its perplexity; a stage
    already written by an interrupted worker is reused."""
    import sparse_runtime as sr
    from sparse_runtime.repair.dsnot import DSnoTConfig
    from sparse_runtime.repair.dsnot_passes import repair_dsnot_checkpoint

    work = Work(args.model, args.protocol)
    dev = None if args.device == "cpu" else args.device
    oneshot, dsnot = work.base_dir(args.base, "oneshot"), work.base_dir(args.base, "dsnot")
    info: dict[str, Any] = {"base": args.base, "prune_config": BASES[args.base], "model": args.model,
                            "protocol": args.protocol, "device": args.device}
    t0 = time.perf_counter()
    if not (oneshot / "sparsity_manifest.json").is_file():
        cfg = sr.PruneConfig(protocol=args.protocol, device=dev, **BASES[args.base])
        res = sr.prune_checkpoint(args.model, cfg, oneshot, overwrite=True, data_dir=args.data_dir, plot=False)
        info.update(prune_s=res.timing["total_s"], allocation_info=res.allocation_info, structure=res.structure)
    lm = sr.load_model(oneshot)
    info["oneshot"] = {"sparsity": lm.manifest.total_measured, **_ppl(_on_device(lm, args), args)}
    del lm
    t1 = time.perf_counter()
    rep = repair_dsnot_checkpoint(oneshot, dsnot, DSnoTConfig(), overwrite=True, data_dir=args.data_dir,
                                  protocol=args.protocol, device=dev)
    lm = sr.load_model(dsnot)
    info["dsnot"] = {"sparsity": lm.manifest.total_measured, "report": {k: v for k, v in rep.as_dict().items()
                                                                         if k != "layers"},
                     "dsnot_s": time.perf_counter() - t1, **_ppl(_on_device(lm, args), args)}
    info.update(wall_s=time.perf_counter() - t0, peak_rss_mb=_peak_mb())
    write_json(work.info_path(args.base), info)
    return info


def worker_config(cfg: Config, args) -> dict[str, Any]:
    """Fine-tune the DSnoT base (resuming a checkpoint a killed run left), merge, verify, evaluate."""
    import sparse_runtime as sr
    from sparse_runtime.adapters.io import read_adapter_config
    from sparse_runtime.merge import merge_adapter_dir
    from sparse_runtime.training import TrainConfig, finetune
    from sparse_runtime.training.checkpoint import latest_checkpoint
    from sparse_runtime.training.engine import _stale_runs

    work, budget = Work(args.model, args.protocol), budget_of(args)
    base_dir = work.base_dir(cfg.base, "dsnot")
    run = work.run_dir(cfg, budget)
    adapter = run / "adapter"
    tc = TrainConfig(method=cfg.method, data="c4", steps=budget.steps, batch_size=budget.batch,
                     seq_len=budget.seq_len, loss_chunk_tokens=args.loss_chunk, save_every=args.save_every, seed=0,
                     distill=cfg.distill, distill_weight=DISTILL_WEIGHT, distill_temperature=DISTILL_T)
    # resume=True continues what a killed run left: its hidden run directory beside ``adapter`` (where
    # training writes until it completes), or the checkpoints of a finished run
    resume = not args.retrain and (latest_checkpoint(adapter) is not None or bool(_stale_runs(adapter)))
    t0 = time.perf_counter()
    with tf32_training(args.tf32):  # evaluation below stays full fp32
        res, lm = finetune(str(base_dir), adapter, tc, {"rank": RANK}, data_dir=args.data_dir, resume=resume,
                           overwrite=True, device=None if args.device == "cpu" else args.device)
    if res.resumed_from:
        print(f"[{cfg.name}] resumed from {res.resumed_from}", flush=True)
    train_wall = time.perf_counter() - t0
    train = res.as_dict()
    del lm
    import gc

    gc.collect()
    meta = read_adapter_config(adapter)
    t0 = time.perf_counter()
    merged, rep = merge_adapter_dir(adapter, run / "merged", overwrite=True, data_dir=args.data_dir,
                                    protocol=args.protocol)
    merge_s = time.perf_counter() - t0
    mm = sr.load_model(merged)
    check = sparsity_check(sr.read_manifest(base_dir), mm)
    p_merged = _ppl(_on_device(mm, args), args)
    del mm
    if not args.keep_merged:
        import shutil

        shutil.rmtree(merged, ignore_errors=True)
    log = [r for r in read_log(adapter) if "step_s" in r]
    last = log[-1] if log else {}
    return {"kind": "finetune", "train": {k: v for k, v in train.items() if k != "losses"},
            "losses_first_last": [train["losses"][0], train["losses"][-1]] if train.get("losses") else None,
            "loss_parts_last": {k: last.get(k) for k in ("ce", "kd_logits", "kd_blocks")},
            "train_cfg": meta.get("train"), "adapter_cfg": meta.get("config"), "ppl_merged": p_merged,
            "merge": rep.as_dict(), "merge_s": merge_s, "check": check, "train_wall_s": train_wall,
            **step_stats([r["step_s"] for r in log]), "peak_rss_mb_process": _peak_mb(),
            "peak_device_mb_process": _peak_device_mb(), "device": args.device, "tf32_training": bool(args.tf32)}


def worker_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "dense":
        out = worker_dense(args)
    elif args.worker == "base":
        out = worker_base(args)
    else:
        out = worker_config(CONFIGS[args.config], args)
    if args.result:
        write_json(Path(args.result), out)


# ---------------------------------------------------------------------------------------------
# the parent
def spawn(args, extra: list[str], tag: str) -> tuple[int, float, float]:
    cmd = bench_ft_quick.worker_command(args, __file__, extra)
    return spawn_worker(cmd, Path(args.log_dir) / f"{slug(tag)}.log" if args.log_dir else None)


def ensure(args, work: Work, base: str) -> dict[str, Any]:
    with work.lock(f"base-{base}"):
        info = work.info(base)
        if info is None:
            print(f"== preparing {base} ({args.model}, {args.protocol})", flush=True)
            rc, wall, _ = spawn(args, ["dense"] if base == "dense" else ["base", "--base", base], f"base-{base}")
            info = work.info(base)
            if rc or info is None:
                raise RuntimeError(f"preparing {base} failed (exit {rc})")
        return info


STEM = "fused_quick"  # the table's file name (bench_ft_quick's naming, this stem)
results_path = partial(bench_ft_quick.results_path, stem=STEM)
out_name = partial(bench_ft_quick.out_name, stem=STEM)
load_rows = partial(bench_ft_quick.load_rows, stem=STEM)


def select(spec: Optional[str], done: set[str], budget: Budget) -> list[str]:
    if spec:
        spec = ",".join(",".join(n for n, c in CONFIGS.items() if c.tier == int(t[4:]))
                        if t.strip() in ("tier1", "tier2", "tier3") else t for t in spec.split(","))
    return select_names(spec, list(CONFIGS), lambda c: row_key(c, budget, "finetune") not in done)


def target_of(base: str) -> str:
    return "2:4" if base.endswith("2:4") else f"{base.rsplit('-', 1)[1]} %"


def make_row(cfg: Config, budget: Budget, dense: dict[str, Any], base: dict[str, Any], res: dict[str, Any],
             wall: float, child_peak: Optional[float], device: str, jobs: int) -> dict[str, Any]:
    tr, chk = res["train"], res["check"]
    return {
        "key": row_key(cfg.name, budget, "finetune"), "config": cfg.name, "tier": cfg.tier,
        "target": target_of(cfg.base), "allocation": BASES[cfg.base].get("allocation", "uniform"),
        "one-shot": BASES[cfg.base]["method"], "fine-tuning": cfg.method, "distill": cfg.distill,
        "budget": budget.flag, "budget used": ("REDUCED: " if budget.flag == "reduced" else "")
        + f"{tr['steps']} x {budget.batch} x {budget.seq_len}", "batch": budget.batch, "seq_len": budget.seq_len,
        "tokens": tr["tokens"], "lr / schedule": lr_text(res.get("train_cfg")),
        "ppl dense": dense["ppl"], "ppl one-shot": base["oneshot"]["ppl"], "ppl +DSnoT": base["dsnot"]["ppl"],
        "ppl +fine-tuning (merged)": res["ppl_merged"]["ppl"], "x dense": res["ppl_merged"]["ppl"] / dense["ppl"],
        "sparsity after": chk["sparsity"], "sparsity = base": eq_text(chk, "finetune"),
        "last step CE / KL / blocks": res.get("loss_parts_last"),
        "step s (median)": res.get("step_s_median"), "peak train RSS MB": tr.get("peak_rss_mb"),
        "peak process RSS MB": child_peak, "peak train CUDA MB": tr.get("peak_device_mb"), "wall s": wall,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_short(device), "device": device,
        "concurrent configs": jobs, "detail": {"config": res, "base": base},
    }


COLUMNS = ["config", "target", "allocation", "one-shot", "fine-tuning", "distill", "budget used", "ppl dense",
           "ppl one-shot", "ppl +DSnoT", "ppl +fine-tuning (merged)", "x dense", "sparsity = base", "step s (median)",
           "peak train RSS MB", "peak train CUDA MB", "device"]


def save_table(args, rows: list[dict[str, Any]], ran: list[str], t_run: float) -> None:
    import contextlib

    from sparse_runtime.report import save_results

    pos = {c: i for i, c in enumerate(CONFIGS)}
    rows = sorted(rows, key=lambda r: (pos.get(r["config"], len(pos)), r["key"]))
    have = {r["key"] for r in rows}
    missing = [c for c in CONFIGS if c not in have]
    reduced = [r["key"] for r in rows if r.get("budget") == "reduced"]
    import sparse_runtime as sr

    proto = sr.get_protocol(args.protocol)
    notes = [
        f"pipeline per row: allocation + one-shot pruning (`{args.protocol}` calibration: {proto.calib_samples} x "
        f"{proto.calib_seqlen} C4 tokens, seed {proto.calib_seed}) -> DSnoT (default options, a separate pass from "
        "the one-shot checkpoint) -> fine-tuning (C4 windows, data seed 1, the budget of the row's 'budget used': "
        f"ft-quick is {FT_QUICK['steps']} x {FT_QUICK['batch']} x {FT_QUICK['seq_len']}; rank 8 or its parameter "
        "equivalent, each method's defaults) -> exact merge; the ppl columns are the checkpoint after each stage "
        f"(WikiText-2 under `{args.protocol}`)",
        f"distillation (docs/finetuning.md#distillation): loss = (1 - {DISTILL_WEIGHT}) CE + {DISTILL_WEIGHT} KD, "
        f"T = {DISTILL_T}; teacher = the dense model the base was pruned from (manifest dense_source); the cost "
        "is one teacher forward per micro-batch: compare step s of a kd row with its no-kd row (same machine)",
        "sparsity = base: nonzeros of every layer of the merged checkpoint against the DSnoT base's manifest, N:M "
        "per group",
        f"LM-head loss in checkpointed chunks of {args.loss_chunk} tokens for every row; fp32; seed 0",
        "tiers: 1 decides the table (candidate base per sparsity, SEFT, every distillation mode), 2 the other "
        "fine-tuning methods, 3 the other bases",
    ]
    if reduced:
        notes.append("REDUCED rows did NOT use the ft-quick budget; they are smoke or partial runs: "
                     + ", ".join(reduced))
    notes.append(("MISSING: " + ", ".join(missing)) if missing else "complete: every configuration has a row")
    notes.append(f"last invocation: {', '.join(ran) or '-'}; wall {time.perf_counter() - t_run:.0f} s")
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        path = save_results(out_name(args), f"Fused repair pipelines at equal budget: {args.model}", rows,
                            protocol=f"ft-quick fine-tuning + `{args.protocol}` perplexity after every stage",
                            model=args.model, notes=notes, columns=COLUMNS, out_dir=args.out_dir,
                            extra={"bench": {"model": args.model, "eval_protocol": args.protocol, "missing": missing,
                                             "reduced": reduced}})
    print(f"saved {path} ({len(rows)} rows; {len(missing)} configurations missing)", flush=True)


def estimate(cfg: Config, budget: Budget, args, work: Work, planned: set) -> float:
    """Seconds, from bench_ft_quick's priors (a prior, not a measurement); distillation adds one teacher
    forward per step, about a third of a forward + backward."""
    import sparse_runtime as sr

    p = model_params(args.model)
    scale = (p / PRIOR["params"]) if p else 1.0
    proto = sr.get_protocol(args.protocol)
    ev = scale * PRIOR["ppl_s"] * (proto.eval_seqlen * (proto.eval_windows or 300)) / 20480
    prune = scale * PRIOR["prune_s"] * proto.calib_samples * proto.calib_seqlen / 16384
    step = scale * PRIOR["step_s"] * budget.batch * budget.seq_len / 4096 * (1.0 if cfg.distill == "none" else 4 / 3)
    t = 0.0
    if work.info(cfg.base) is None and cfg.base not in planned:
        alloc = {"atp": 5 * ev * 16 / 40, "owl": prune}.get(BASES[cfg.base].get("allocation", "uniform"), 0.0)
        t += 2 * prune + alloc + 2 * ev  # one-shot, DSnoT pass, two perplexities
        planned.add(cfg.base)
    init = {"seft": 16, "lors": 128}.get(cfg.method, 0) / budget.batch * step
    return t + init + budget.steps * step + ev + 2 * PRIOR["load_s"] * scale


def dry_run(args, work: Work, rows: list[dict[str, Any]], names: list[str]) -> None:
    budget = budget_of(args)
    have = {r["key"] for r in rows}
    print(f"plan: model {args.model}, protocol {args.protocol}, budget {budget.text} ({budget.flag}), work dir "
          f"{work.root}, table {results_path(args)}")
    total, planned = 0.0, set()
    for name in names or list(CONFIGS):
        cfg = CONFIGS[name]
        done = row_key(name, budget, "finetune") in have
        sec = estimate(cfg, budget, args, work, planned)
        total += 0.0 if done else sec
        print(f"  tier {cfg.tier}  {name:44s} {'done' if done else 'missing':8s} {sec / 60:7.1f} min  {cfg.about}")
    print(f"estimated total for what is missing above: {total / 3600:.1f} h on this machine class (priors from "
          "bench_ft_quick.py; a GPU takes minutes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="configurations:\n"
                                 + "\n".join(f"  tier {c.tier}  {n}" for n, c in CONFIGS.items()))
    ap.add_argument("--only", "--configs", dest="configs", default=None,
                    help="comma list of names, patterns, tier1|tier2|tier3, 'missing' or 'all'")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--protocol", default="quick", help="calibration and perplexity (quick; 'test' for smoke runs)")
    ap.add_argument("--name", default=None, help="result file name (default fused_quick for smollm2-135m/quick)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    add_run_arguments(ap)
    args = ap.parse_args()
    if args.worker:
        worker_main(args)
        return
    check_run_arguments(args)
    budget = budget_of(args)
    work = Work(args.model, args.protocol)
    rows = load_rows(args)
    done = {r["key"] for r in rows}
    names = select(args.configs, done, budget)
    if args.dry_run:
        dry_run(args, work, rows, names)
        return
    if not names:
        raise SystemExit("name the configurations to run: --only NAME[,NAME...] | tier1 | missing | all "
                         "(--dry-run lists them with their status and cost)")
    t_run = time.perf_counter()
    ran: list[str] = []
    failed: list[str] = []
    state = {"rows": rows}
    lock = threading.Lock()

    def one(i: int, name: str) -> None:
        cfg = CONFIGS[name]
        key = row_key(name, budget, "finetune")
        if key in done and not args.force:
            print(f"[{i}/{len(names)}] {name}: already in the table, skipped (--force reruns it)", flush=True)
            return
        print(f"[{i}/{len(names)}] {name}: {cfg.about}; budget {budget.text} ({budget.flag})", flush=True)
        t0 = time.perf_counter()
        try:
            dense, base = ensure(args, work, "dense"), ensure(args, work, cfg.base)
            result = work.run_dir(cfg, budget) / "result.json"
            result.parent.mkdir(parents=True, exist_ok=True)
            result.unlink(missing_ok=True)
            with work.lock(f"run-{cfg.name}-{budget.tag}"):
                rc, _, child_peak = spawn(args, ["config", "--config", name, "--result", str(result),
                                                 *(["--retrain"] if args.force else [])], f"{name}-{budget.tag}")
            if rc or not result.is_file():
                raise RuntimeError(f"worker exited with {rc}")
            res = json.loads(result.read_text())
        except (RuntimeError, OSError) as e:
            print(f"[{i}/{len(names)}] {name} FAILED: {e}", flush=True)
            failed.append(name)
            return
        row = make_row(cfg, budget, dense, base, res, time.perf_counter() - t0, child_peak, args.device, args.jobs)
        with lock, work.lock("results"):
            rows_now = [r for r in load_rows(args) if r["key"] != row["key"]] + [row]
            args.replace = False
            state["rows"] = rows_now
            ran.append(row["key"])
            save_table(args, rows_now, ran, t_run)
        print(f"[{i}/{len(names)}] {name}: ppl dense {row['ppl dense']:.2f}, one-shot {row['ppl one-shot']:.2f}, "
              f"+DSnoT {row['ppl +DSnoT']:.2f}, +fine-tuning {row['ppl +fine-tuning (merged)']:.2f} "
              f"({row['sparsity = base']})", flush=True)

    run_queue(names, one, args.jobs)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (their rows are missing; rerun them)")


if __name__ == "__main__":
    main()
