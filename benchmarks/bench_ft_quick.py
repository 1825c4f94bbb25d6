"""The ``ft-quick`` fine-tuning comparison, resumable: one (or a few) configurations per invocation,
merged into one saved table that fills in over several sessions.

    python benchmarks/bench_ft_quick.py --dry-run                       # plan, status, cost estimate
    flock /tmp/sparse-runtime-bench.lock python benchmarks/bench_ft_quick.py --configs lors@wanda-50
    python benchmarks/bench_ft_quick.py --configs missing               # everything not measured yet
    python benchmarks/bench_ft_quick.py --device cuda --tf32 --jobs 8 --configs all --log-dir L   # a GPU: minutes

Protocol (``docs/protocols.md#ft-quick``): ``ft-quick`` = C4 windows of 512 tokens (data seed
1), 200 optimiser steps x 8 sequences, rank 8 or its parameter equivalent, each method's own
learning rate and schedule; quality = WikiText-2 ``quick`` perplexity of the pruned base (before)
and of the merged checkpoint (after). Pruned bases are Wanda 50 %, 70 % and 2:4 under ``quick``
calibration (32 x 512 C4, seed 0), cached in ``$SR_BENCH_WORK`` (default /tmp/sr-bench-ftquick)
and shared by every configuration.

Configurations (``--configs``; a comma list of names, shell-style patterns such as ``*@wanda-50``,
``missing`` or ``all``) come from the :data:`CONFIGS` registry: ``dense`` and ``wanda-only@BASE``
(no fine-tuning: the baselines), ``masked-lora|lors|dense-lora|dense-lora-rewanda|seft@BASE``
(BASE = wanda-50 | wanda-70 | wanda-2:4) and ``losa@50|70``, ``losa-atp@50|70`` (LoSA from the
dense model, T = 5, the ft-quick budget split over the rounds, RMI or ATP allocation).

Each configuration is trained, merged and evaluated in a FRESH subprocess (its peak RSS is its
own: ``os.wait4`` on that child, plus the trainer's own high-water mark at the end of training).
Training writes resumable checkpoints every ``--save-every`` steps; an interrupted configuration
resumes from its last checkpoint on the next invocation (LoSA cannot resume: it restarts). The
table is written after every configuration, so a long invocation leaves its finished rows behind.
``--steps``/``--batch``/``--seq-len`` below the ft-quick budget give rows flagged ``reduced``
(kept beside, never replacing, the ft-quick rows, and marked REDUCED in the markdown).

Saves ``benchmarks/results/<name>.{md,json}`` (``--name``; default ``ft_quick`` for SmolLM2-135M
under ``quick``) through :func:`sparse_runtime.report.save_results`.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from _common import tf32_training  # the script's folder is on sys.path
from _scheduler import WorkDir, load_table, model_slug, run_queue, select_names, slug, spawn_worker, write_json

ROOT = Path(__file__).resolve().parents[1]
RANK = 8
FT_QUICK = {"steps": 200, "batch": 8, "seq_len": 512}
DEFAULT_WORK = "/tmp/sr-bench-ftquick"

# ---------------------------------------------------------------------------------------------
# the registry
BASES: dict[str, Optional[dict[str, Any]]] = {
    # name -> PruneConfig options (protocol added at run time); "dense" is the unpruned model
    "dense": None,
    "wanda-50": dict(method="wanda", sparsity=0.5),
    "wanda-70": dict(method="wanda", sparsity=0.7),
    "wanda-2:4": dict(method="wanda", structure="2:4"),
}

# fine-tuning methods run on a pruned base; options go to the method's adapter config unchanged,
# so everything not named here is the method's own default (printed in the notes).
FT_METHODS: dict[str, dict[str, Any]] = {
    "masked-lora": dict(method="masked-lora", options={"rank": RANK},
                        about="masked LoRA through autograd (SQFT-style), W + s(BA)*M"),
    "lors": dict(method="lors", options={"rank": RANK},
                 about="LoRS: masked LoRA with weight recompute, exact masked gradient, gradient-SVD init"),
    "dense-lora": dict(method="dense-lora", options={"rank": RANK}, reprune="mask",
                       about="plain LoRA, merged densely then re-pruned with the BASE mask"),
    "dense-lora-rewanda": dict(method="dense-lora", options={"rank": RANK}, reprune="wanda",
                               about="plain LoRA, merged densely then re-pruned by Wanda (LoRA*, the package's "
                                     "default merge); shares the dense-lora adapter, costs one merge"),
    "seft": dict(method="seft", options={"rank": RANK},
                 about="SEFT: sparse deltas, evolving mask; K = 8(in+out) per layer (SEFTConfig.rank = the LoRA "
                       "rank-8 parameter equivalent)"),
}

LOSA_VARIANTS: dict[str, dict[str, Any]] = {
    "losa": dict(allocation="rmi", about="LoSA from the dense model, T=5, RMI + LP allocation"),
    "losa-atp": dict(allocation="atp", about="LoSA from the dense model, T=5, ATP allocation"),
}


@dataclass
class Config:
    name: str
    kind: str  # "eval" (no fine-tuning) | "finetune" | "losa"
    base: str  # a BASES key
    method: str = ""  # FINETUNE_METHODS name, or "losa"
    options: dict[str, Any] = field(default_factory=dict)
    reprune: Optional[str] = None  # dense-lora merge
    about: str = ""

    def train_key(self) -> str:
        """Runs sharing a trained adapter (dense-lora / dense-lora-rewanda) share this key."""
        if self.kind == "finetune":
            return f"{self.method}@{self.base}"
        return self.name


def _registry() -> dict[str, Config]:
    reg = {"dense": Config("dense", "eval", "dense", about="unpruned model, no fine-tuning (reference)")}
    for base, spec in BASES.items():
        if spec is None:
            continue
        reg[f"wanda-only@{base}"] = Config(f"wanda-only@{base}", "eval", base,
                                           about="one-shot Wanda, no fine-tuning (the baseline)")
        for mname, m in FT_METHODS.items():
            name = f"{mname}@{base}"
            reg[name] = Config(name, "finetune", base, m["method"], dict(m["options"]), m.get("reprune"), m["about"])
        if spec.get("structure", "unstructured") == "unstructured":  # LoSA cannot do N:M
            pct = int(round(spec["sparsity"] * 100))
            for vname, v in LOSA_VARIANTS.items():
                name = f"{vname}@{pct}"
                reg[name] = Config(name, "losa", "dense", "losa", {"sparsity": spec["sparsity"],
                                                                    "allocation": v["allocation"]}, about=v["about"])
    return reg


CONFIGS: dict[str, Config] = _registry()


# ---------------------------------------------------------------------------------------------
# budget, paths, locks
@dataclass(frozen=True)
class Budget:
    steps: int
    batch: int
    seq_len: int

    @property
    def flag(self) -> str:
        ft = (self.steps, self.batch, self.seq_len) == (FT_QUICK["steps"], FT_QUICK["batch"], FT_QUICK["seq_len"])
        return "ft-quick" if ft else "reduced"

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.seq_len

    @property
    def tag(self) -> str:
        return f"s{self.steps}-b{self.batch}-l{self.seq_len}"

    @property
    def text(self) -> str:
        return f"{self.steps} x {self.batch} x {self.seq_len}"


def budget_of(args) -> Budget:
    return Budget(args.steps or FT_QUICK["steps"], args.batch or FT_QUICK["batch"], args.seq_len or FT_QUICK["seq_len"])


def row_key(config: str, budget: Budget, kind: str) -> str:
    if kind == "eval" or budget.flag == "ft-quick":
        return config
    return f"{config} [reduced {budget.text}]"


class Work(WorkDir):
    """``$SR_BENCH_WORK/<model>-<protocol>/``: bases/, runs/, locks/ (the scheduler's shared work dir)."""

    def __init__(self, model: str, protocol: str) -> None:
        super().__init__(Path(os.environ.get("SR_BENCH_WORK", DEFAULT_WORK)) / f"{model_slug(model)}-{slug(protocol)}")

    def base_dir(self, base: str) -> Path:
        return self.root / "bases" / slug(base)

    def base_info_path(self, base: str) -> Path:
        return self.root / "bases" / f"{slug(base)}.json"

    def base_info(self, base: str) -> Optional[dict[str, Any]]:
        p = self.base_info_path(base)
        if not p.is_file():
            return None
        info = json.loads(p.read_text())
        if base != "dense" and not (self.base_dir(base) / "sparsity_manifest.json").is_file():
            return None
        return info

    def run_dir(self, cfg: Config, budget: Budget) -> Path:
        return self.root / "runs" / slug(f"{cfg.train_key()}-{budget.tag}")


def read_log(run: Path) -> list[dict[str, Any]]:
    f = run / "train_log.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.is_file() else []


def step_stats(times: list[float]) -> dict[str, Any]:
    body = times[1:] if len(times) > 2 else times  # the first step is a warm-up
    return {"step_s_median": statistics.median(body) if body else None, "train_s": sum(times),
            "logged_steps": len(times)}


# ---------------------------------------------------------------------------------------------
# workers (each runs in a fresh process)
def _ppl(lm, args) -> dict[str, Any]:
    import sparse_runtime as sr

    r = sr.wikitext2_perplexity(lm.model, lm.tokenizer, args.protocol, args.data_dir)
    return {"ppl": r.ppl, "seconds": r.seconds, "windows": r.windows, "seqlen": r.seqlen}


def _peak_mb() -> float:
    from sparse_runtime.runtime.base import peak_rss_mb

    return peak_rss_mb()


def _peak_device_mb() -> Optional[float]:
    """The process's CUDA high-water mark (allocated tensors, MiB), or None without CUDA."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None


def _on_device(lm, args):
    """Move a loaded model to ``--device`` for evaluation (a no-op on the CPU)."""
    if args.device != "cpu":
        lm.model.to(args.device)
    return lm


def _rank8_equivalent(lm, targets) -> int:
    """Trainable count of a rank-8 LoRA on the target linears: 8 * sum(in + out)."""
    n = 0
    for name, lin in lm.family.iter_linears(lm.model):
        if ".".join(name.split(".")[-2:]) in targets:
            n += RANK * (lin.in_features + lin.out_features)
    return n


def worker_base(args) -> dict[str, Any]:
    """Prune (or, for ``dense``, only load) the base and measure its quick perplexity."""
    import sparse_runtime as sr

    work = Work(args.model, args.protocol)
    t0 = time.perf_counter()
    if args.base == "dense":
        lm = sr.load_model(args.model)
        lin = [l for _, l in lm.family.iter_linears(lm.model)]
        info = {"base": "dense", "checkpoint": args.model, "structure": "-", "target": 0.0,
                "sparsity": sum(int((l.weight == 0).sum()) for l in lin) / sum(l.weight.numel() for l in lin)}
    else:
        out = work.base_dir(args.base)
        cfg = sr.PruneConfig(protocol=args.protocol, device=None if args.device == "cpu" else args.device,
                             **BASES[args.base])
        res = sr.prune_checkpoint(args.model, cfg, out, overwrite=True, data_dir=args.data_dir, plot=False)
        lm = sr.load_model(out)
        info = {"base": args.base, "checkpoint": str(out), "structure": res.structure,
                "target": res.sparsity_target, "sparsity": res.sparsity_measured, "prune_s": res.timing["total_s"],
                "calibration": res.calibration, "prune_config": BASES[args.base]}
    p = _ppl(_on_device(lm, args), args)
    info.update(ppl=p["ppl"], ppl_s=p["seconds"], ppl_windows=p["windows"], ppl_seqlen=p["seqlen"],
                wall_s=time.perf_counter() - t0, peak_rss_mb=_peak_mb(), protocol=args.protocol, model=args.model,
                device=args.device)
    write_json(work.base_info_path(args.base), info)
    return info


def sparsity_check(base_manifest, lm) -> dict[str, Any]:
    """Measured from the merged weights, per layer, against the base manifest."""
    from sparse_runtime.sparsity import nm_compliant, parse_structure

    lin = dict(lm.family.iter_linears(lm.model))
    names = sorted(base_manifest.layers)
    nnz = {n: int((lin[n].weight != 0).sum()) for n in names}
    differ = [n for n in names if nnz[n] != base_manifest.layers[n].nnz]
    moved = [n for n in names if lm.manifest is not None and n in lm.manifest.layers
             and lm.manifest.layers[n].mask_sha256 != base_manifest.layers[n].mask_sha256]
    nm = {n: parse_structure(base_manifest.layers[n].structure) for n in names}
    nm = {n: p for n, p in nm.items() if p is not None}
    nm_bad = [n for n, p in nm.items() if not nm_compliant(lin[n].weight.detach(), p)]
    numel = sum(lin[n].weight.numel() for n in names)
    return {"sparsity": 1.0 - sum(nnz.values()) / numel, "base_sparsity": base_manifest.total_measured,
            "layers": len(names), "layers_nnz_differ": len(differ), "first_differing": differ[:3],
            "layers_mask_moved": len(moved), "nm_layers": len(nm), "nm_broken": len(nm_bad),
            "exact": not differ and not nm_bad}


def worker_finetune(cfg: Config, args) -> dict[str, Any]:
    import sparse_runtime as sr
    from sparse_runtime.adapters.io import attach_saved_adapter, read_adapter_config
    from sparse_runtime.merge import merge_adapter_dir
    from sparse_runtime.training import TrainConfig, finetune
    from sparse_runtime.training.checkpoint import latest_checkpoint, read_state
    from sparse_runtime.training.engine import _stale_runs

    work, budget = Work(args.model, args.protocol), budget_of(args)
    base_dir = work.base_dir(cfg.base)
    run = work.run_dir(cfg, budget)
    adapter = run / "adapter"
    tc = TrainConfig(method=cfg.method, data="c4", steps=budget.steps, batch_size=budget.batch,
                     seq_len=budget.seq_len, loss_chunk_tokens=args.loss_chunk, save_every=args.save_every, seed=0)
    fin = adapter / "finetune.json"
    done = False
    if fin.is_file() and (adapter / "adapter_config.json").is_file() and not args.retrain:
        meta = read_adapter_config(adapter)
        t = meta.get("train", {})
        done = (meta.get("method") == cfg.method and t.get("steps") == budget.steps
                and t.get("batch_size") == budget.batch and t.get("seq_len") == budget.seq_len
                and {k: meta["config"].get(k) for k in cfg.options} == cfg.options)
    t0 = time.perf_counter()
    if done:  # trained by an earlier invocation (or the sibling config sharing this adapter)
        train = json.loads(fin.read_text())
        train["reused"] = True
        lm = sr.load_model(base_dir)
        attach_saved_adapter(lm.model, lm.family, adapter, lm.manifest)
        _on_device(lm, args)
    else:
        # resume=True also continues a killed run, whose checkpoints lie in its hidden run directory beside
        # ``adapter`` (training writes there until it completes)
        resume = not args.retrain and (latest_checkpoint(adapter) is not None or bool(_stale_runs(adapter)))
        with tf32_training(args.tf32):  # evaluation below stays full fp32
            res, lm = finetune(str(base_dir), adapter, tc, dict(cfg.options), data_dir=args.data_dir, resume=resume,
                               overwrite=True, device=None if args.device == "cpu" else args.device)
        if res.resumed_from:
            print(f"[{cfg.name}] resumed from {res.resumed_from}", flush=True)
        train = res.as_dict()
        train["reused"] = False
    train_wall = time.perf_counter() - t0
    targets = lm.family.linear_names if "targets" not in cfg.options else cfg.options["targets"]
    rank8 = _rank8_equivalent(lm, set(targets))
    p_adapter = _ppl(lm, args)
    del lm
    gc.collect()
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    meta = read_adapter_config(adapter)
    t0 = time.perf_counter()
    merged, rep = merge_adapter_dir(adapter, run / f"merged-{cfg.reprune or 'exact'}", reprune=cfg.reprune or "wanda",
                                    overwrite=True, data_dir=args.data_dir, protocol=args.protocol)
    merge_s = time.perf_counter() - t0
    base_manifest = sr.read_manifest(base_dir)
    mm = sr.load_model(merged)
    check = sparsity_check(base_manifest, mm)
    p_merged = _ppl(_on_device(mm, args), args)
    del mm
    if not args.keep_merged:
        import shutil

        shutil.rmtree(merged, ignore_errors=True)
    log = read_log(adapter)
    out: dict[str, Any] = {
        "kind": "finetune", "train": {k: v for k, v in train.items() if k != "losses"},
        "losses_first_last": [train["losses"][0], train["losses"][-1]] if train.get("losses") else None,
        "train_cfg": meta.get("train"), "adapter_cfg": meta.get("config"), "rank8_equivalent": rank8,
        "ppl_adapter": p_adapter, "ppl_merged": p_merged, "merge": rep.as_dict(), "merge_s": merge_s,
        "check": check, "train_wall_s": train_wall, **step_stats([r["step_s"] for r in log if "step_s" in r]),
        "peak_rss_mb_process": _peak_mb(), "peak_device_mb_process": _peak_device_mb(), "device": args.device,
        "tf32_training": bool(args.tf32), "merged_checkpoint": str(merged) if args.keep_merged else None,
    }
    if cfg.method == "seft":
        ck = latest_checkpoint(adapter)
        hist = ((read_state(ck).get("callbacks") or [{}])[0].get("history", [])) if ck else []
        ev = rep.as_dict().get("mask_evolution", {})
        resurrected = sum(v["resurrected"] for v in ev.values())
        kept = sum(r.nnz for r in base_manifest.layers.values())
        out["seft"] = {"evolution_steps": hist, "resurrected": resurrected,
                       "newly_pruned": sum(v["newly_pruned"] for v in ev.values()),
                       "mask_evolved_share": resurrected / max(1, kept),
                       "regrown_total": sum(h.get("regrown", 0) for h in hist)}
    return out


def worker_losa(cfg: Config, args) -> dict[str, Any]:
    """``run_losa`` as the package runs it. Two in-process wrappers, nothing else changed: Trainer.train
    is wrapped to keep each round's step log and trainable count (the round directories are
    temporary). The same ``--loss-chunk`` as the other methods goes in through LoSAConfig."""
    import sparse_runtime as sr
    from sparse_runtime.losa import LoSAConfig, run_losa
    from sparse_runtime.training import engine

    work, budget = Work(args.model, args.protocol), budget_of(args)
    run = work.run_dir(cfg, budget)
    rounds: list[dict[str, Any]] = []
    orig_train = engine.Trainer.train

    def train(self, *a, **k):
        res = orig_train(self, *a, **k)
        rounds.append({"steps": res.steps, "tokens": res.tokens, "trainable": res.trainable_parameters,
                       "seconds": res.seconds, "step_s": [r["step_s"] for r in read_log(self.out_dir) if "step_s" in r],
                       "loss_first_last": [res.losses[0], res.losses[-1]] if res.losses else None,
                       "peak_device_mb": res.peak_device_mb, "cfg": self.cfg.to_dict()})
        return res

    engine.Trainer.train = train
    lcfg = LoSAConfig(protocol=args.protocol, steps=budget.steps, train_batch_size=budget.batch,
                      seq_len=budget.seq_len, rank=RANK, loss_chunk_tokens=args.loss_chunk,
                      device=None if args.device == "cpu" else args.device, **cfg.options)
    out_dir = run / "merged"
    import shutil

    for stale in run.glob(".merged.losa-*"):  # dense reference outputs of a killed run (LoSA cannot resume)
        shutil.rmtree(stale, ignore_errors=True)
    t0 = time.perf_counter()
    with tf32_training(args.tf32):  # the whole LoSA run: its re-prunes and RMI passes too
        res = run_losa(args.model, out_dir, lcfg, data_dir=args.data_dir, overwrite=True)
    losa_s = time.perf_counter() - t0
    peak = _peak_mb()
    mm = sr.load_model(out_dir)
    p_merged = _ppl(_on_device(mm, args), args)
    lin = dict(mm.family.iter_linears(mm.model))
    man = mm.manifest
    dev = {n: abs(r.measured - r.target) for n, r in man.layers.items() if r.target is not None and n in lin}
    over = [n for n, d in dev.items() if d > 1.0 / lin[n].in_features + 1e-12]
    rank8 = _rank8_equivalent(mm, set(lcfg.targets or mm.family.linear_names))
    del mm
    if not args.keep_merged:
        shutil.rmtree(out_dir, ignore_errors=True)
    steps_all = [s for r in rounds for s in r["step_s"]]
    tot = sum(r["steps"] for r in rounds) or 1
    trainable = [r["trainable"] for r in rounds]
    dev_peaks = [r["peak_device_mb"] for r in rounds if r.get("peak_device_mb") is not None]
    return {
        "kind": "losa", "config": lcfg.to_dict(), "train_cfg": rounds[0]["cfg"] if rounds else None,
        "rounds": [{k: v for k, v in r.items() if k not in ("step_s", "cfg")} for r in rounds],
        "round_records": [{"round": r.round, "target": r.target, "delta": r.delta, "measured": r.measured_mean,
                           "steps": r.steps, "rank_budget": r.rank_budget, "ranks": r.ranks,
                           "block_rates": r.block_rates, "block_measured": r.block_measured, "errors": r.errors,
                           "importance": r.importance, "final_loss": r.final_loss, "timing": r.timing}
                          for r in res.rounds],
        "blocks": list(res.blocks),
        "train": {"steps": sum(r["steps"] for r in rounds), "tokens": sum(r["tokens"] for r in rounds),
                  "trainable_parameters": sum(r["trainable"] * r["steps"] for r in rounds) / tot,
                  "trainable_range": [min(trainable), max(trainable)] if trainable else None,
                  "peak_rss_mb": peak, "peak_device_mb": max(dev_peaks) if dev_peaks else None,
                  "seconds": sum(r["seconds"] for r in rounds)},
        "timing": res.timing, "rank8_equivalent": rank8, "ppl_merged": p_merged, "losa_wall_s": losa_s,
        "check": {"sparsity": res.sparsity_measured, "target": lcfg.sparsity,
                  "max_layer_deviation": max(dev.values()) if dev else None, "layers_over_row_rounding": len(over),
                  "exact": not over},
        "merge": res.merge, **step_stats(steps_all), "peak_rss_mb_process": _peak_mb(),
        "peak_device_mb_process": _peak_device_mb(), "device": args.device, "tf32_training": bool(args.tf32),
    }


def worker_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "base":
        out = worker_base(args)
    else:
        cfg = CONFIGS[args.config]
        out = {"finetune": worker_finetune, "losa": worker_losa}[cfg.kind](cfg, args)
    if args.result:
        write_json(Path(args.result), out)


# ---------------------------------------------------------------------------------------------
# the parent: plan, subprocesses, rows, table
def worker_command(args, script: str, extra: list[str]) -> list[str]:
    """The command line of one worker of ``script`` (this file or bench_fused.py): the parent's run
    arguments (``add_run_arguments``) passed on, plus ``extra`` (what the worker does)."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", *extra, "--model", args.model,
           "--protocol", args.protocol, "--threads", str(args.threads), "--loss-chunk", str(args.loss_chunk),
           "--save-every", str(args.save_every), "--device", args.device, *(["--tf32"] if args.tf32 else [])]
    for k in ("steps", "batch", "seq_len", "data_dir"):
        v = getattr(args, k)
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    if args.keep_merged:
        cmd.append("--keep-merged")
    return cmd


def spawn(args, extra: list[str]) -> tuple[int, float, float]:
    """Run a worker; return (exit code, wall s, peak RSS MiB of that child alone, via wait4)."""
    cmd = worker_command(args, __file__, extra)
    # concurrent configurations: one log per worker instead of interleaved bars
    log = Path(args.log_dir) / f"{slug(extra[0] + '-' + extra[2])}.log" if args.log_dir else None
    return spawn_worker(cmd, log)


def ensure_base(args, work: Work, base: str) -> dict[str, Any]:
    with work.lock(f"base-{base}"):
        info = work.base_info(base)
        if info is not None:
            return info
        print(f"== preparing base {base} ({args.model}, {args.protocol} calibration and perplexity)", flush=True)
        rc, wall, _ = spawn(args, ["base", "--base", base])
        info = work.base_info(base)
        if rc or info is None:
            raise RuntimeError(f"preparing base {base} failed (exit {rc})")
        print(f"== base {base}: sparsity {info['sparsity']:.4f}, ppl {info['ppl']:.3f} ({wall:.0f} s)", flush=True)
        return info


def machine_short(device: str = "cpu") -> str:
    from sparse_runtime.report import machine_info

    m = machine_info()
    cpu = f"{m['cpu']} ({m['cores']} cores)"
    if device != "cpu" and m.get("gpu"):
        return f"{m['gpu']} (training and evaluation), host {cpu}"
    return cpu


def lr_text(tc: Optional[dict[str, Any]]) -> str:
    if not tc:
        return ""
    s = f"{tc['lr']:.0e} {tc['schedule']}"
    if tc.get("warmup_ratio"):
        s += f", warmup {tc['warmup_ratio']:.0%}"
    if tc.get("schedule") == "cosine" and tc.get("min_lr"):
        s += f" to {tc['min_lr']:.0e}"
    if tc.get("weight_decay"):
        s += f", wd {tc['weight_decay']:g}"
    if tc.get("max_grad_norm"):
        s += f", clip {tc['max_grad_norm']:g}"
    return s


def eq_text(check: dict[str, Any], kind: str) -> str:
    if kind == "losa":
        return ("per layer at its allocated rate (<= 1/C_in)" if check["exact"] else
                f"NO: {check['layers_over_row_rounding']} layers off their allocation")
    if not check["exact"]:
        return f"NO: {check['layers_nnz_differ']} layers differ, {check['nm_broken']} N:M broken"
    s = f"yes, all {check['layers']} layers"
    if check["nm_layers"]:
        s += ", N:M intact"
    if check["layers_mask_moved"]:
        s += f" (mask moved in {check['layers_mask_moved']})"
    return s


def make_row(cfg: Config, budget: Budget, base: dict[str, Any], res: Optional[dict[str, Any]], wall: float,
             child_peak: Optional[float], load: tuple, device: str = "cpu", jobs: int = 1) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    row: dict[str, Any] = {"key": row_key(cfg.name, budget, cfg.kind), "config": cfg.name,
                           "method": cfg.method or "none",
                           "base": cfg.base if cfg.kind != "losa" else "dense (LoSA prunes)",
                           "ppl before": base["ppl"], "date": now, "machine": machine_short(device),
                           "device": device, "concurrent configs": jobs, "load avg (start, end)": load}
    if res is None:  # no fine-tuning: the base is the result
        row.update({"budget": "-", "budget used": "-", "tokens": 0, "trainable params": 0,
                    "ppl after merge": base["ppl"], "sparsity after": base["sparsity"],
                    "sparsity = base": "(is the base)", "wall s": base.get("prune_s", 0.0) + base.get("ppl_s", 0.0),
                    "detail": {"base": base}})
        return row
    tr, chk = res["train"], res["check"]
    row.update({
        "budget": budget.flag,
        "budget used": ("REDUCED: " if budget.flag == "reduced" else "")
        + f"{tr['steps']} x {budget.batch} x {budget.seq_len}",
        "steps": tr["steps"], "batch": budget.batch, "seq_len": budget.seq_len, "tokens": tr["tokens"],
        "trainable params": round(tr["trainable_parameters"]), "rank-8 equivalent": res["rank8_equivalent"],
        "lr / schedule": lr_text(res.get("train_cfg")),
        "ppl adapter": (res.get("ppl_adapter") or {}).get("ppl"), "ppl after merge": res["ppl_merged"]["ppl"],
        "sparsity after": chk["sparsity"], "sparsity = base": eq_text(chk, res["kind"]),
        "peak train RSS MB": tr.get("peak_rss_mb"), "peak process RSS MB": child_peak,
        "peak train CUDA MB": tr.get("peak_device_mb"), "peak process CUDA MB": res.get("peak_device_mb_process"),
        "step s (median)": res.get("step_s_median"), "train s": res.get("train_s"), "wall s": wall,
        "mask evolved": (res.get("seft") or {}).get("mask_evolved_share"),
        "detail": res,
    })
    if tr.get("resumed_from"):
        row["note"] = (f"resumed from {Path(tr['resumed_from']).name}: peak train RSS and wall are the last attempt's "
                       "(train s sums the logged steps of all attempts)")
    if tr.get("reused"):
        row["note"] = ("adapter reused (trained earlier or by the sibling configuration sharing it); the training "
                       "figures are from that training")
    if res["kind"] == "losa":
        lo, hi = tr.get("trainable_range") or (None, None)
        row["note"] = (f"trainable = steps-weighted mean over rounds (range {lo}..{hi}); peak train RSS covers the "
                       "whole LoSA run (dense reference and pruning passes included)")
    return row


COLUMNS = ["config", "budget", "budget used", "tokens", "trainable params", "lr / schedule", "ppl before",
           "ppl after merge", "sparsity after", "sparsity = base", "peak train RSS MB", "peak train CUDA MB",
           "step s (median)", "wall min", "mask evolved", "device", "note"]


# -- cost estimate ------------------------------------------------------------------------------
# priors for SmolLM2-135M, 2 threads, `quick`, one 8 x 512 step: step 35 s (finetune_memory.md, measured
# medians at 8 x 512: dense LoRA 25 s, LoRS 32 s, masked LoRA 46 s; docs/protocols.md's "about an hour per
# configuration" assumed 18 s); quick perplexity 116 s (ppl_dense.md); Wanda prune 60 s and one 32 x 512
# calibration forward 22 s (pruning_quick.md, quiet machine). Scaled by parameter count and tokens.
PRIOR = {"params": 134.5e6, "step_s": 35.0, "ppl_s": 116.0, "prune_s": 60.0, "fwd_s": 22.0, "load_s": 10.0}


def model_params(model: str) -> Optional[float]:
    if model in ("smollm2-135m",):
        return PRIOR["params"]
    cfg = None
    try:
        if str(model).lower().startswith("tiny-"):
            from sparse_runtime.models.tiny import tiny_config

            cfg = tiny_config(str(model)[5:]).to_dict()
        elif (Path(model) / "config.json").is_file():
            cfg = json.loads((Path(model) / "config.json").read_text())
    except Exception:
        cfg = None
    if not cfg:
        return None
    h, i, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    return L * (2 * h * h + 2 * h * kv + 3 * h * i) + V * h * (1 if cfg.get("tie_word_embeddings", True) else 2)


def estimate(cfg: Config, budget: Budget, args, work: Work, rows: list[dict[str, Any]],
             planned: Optional[set] = None) -> tuple[float, str]:
    """Seconds for one configuration. ``planned`` collects bases and adapters an earlier configuration of
    the same plan already pays for (each is prepared once)."""
    import sparse_runtime as sr

    planned = set() if planned is None else planned
    p = model_params(args.model)
    scale = (p / PRIOR["params"]) if p else 1.0
    proto = sr.get_protocol(args.protocol)
    ev = scale * PRIOR["ppl_s"] * (proto.eval_seqlen * (proto.eval_windows or 300)) / 20480
    fwd = scale * PRIOR["fwd_s"] * proto.calib_samples * proto.calib_seqlen / 16384
    prune = scale * PRIOR["prune_s"] * proto.calib_samples * proto.calib_seqlen / 16384
    step = scale * PRIOR["step_s"] * budget.batch * budget.seq_len / 4096
    src = "prior"
    same = [r for r in rows if r.get("step s (median)") and r.get("tokens")
            and r.get("device", "cpu") == getattr(args, "device", "cpu")]  # GPU step times say nothing of a CPU
    pick = [r for r in same if r.get("method") == cfg.method] or same
    if pick:  # measured: seconds per trained token, same model and machine class
        per_tok = statistics.median(r["step s (median)"] / (r["batch"] * r["seq_len"]) for r in pick)
        step, src = per_tok * budget.batch * budget.seq_len, "measured"
    info = work.base_info(cfg.base)
    t = PRIOR["load_s"] * scale
    if info is None and ("base", cfg.base) not in planned:
        t += ev + (prune if cfg.base != "dense" else 0.0)
        planned.add(("base", cfg.base))
    elif info is not None and "ppl_s" in info:
        ev = info["ppl_s"]
    if cfg.kind == "eval":
        return t, src
    if cfg.kind == "losa":
        rmi = fwd if cfg.options["allocation"] == "rmi" else 0.0
        T = 5
        return t + fwd + T * (rmi + 2 * fwd) + budget.steps * step + ev + 2 * PRIOR["load_s"] * scale, src
    init = {"lors": 128, "seft": 16}.get(cfg.method, 0) / budget.batch * step
    windows = 0.3 * step * 5 * (budget.steps // 60) if cfg.method == "seft" else 0.0
    merge = PRIOR["load_s"] * scale + (fwd if cfg.reprune == "wanda" else 0.0)
    tkey = ("adapter", cfg.train_key())  # the dense-lora sibling shares the adapter
    trained = tkey in planned or (work.run_dir(cfg, budget) / "adapter" / "finetune.json").is_file()
    planned.add(tkey)
    train = 0.0 if trained else init + windows + budget.steps * step
    return t + train + 2 * ev + merge, src


# -- selection, rows, saving ----------------------------------------------------------------------
def select(spec: Optional[str], done: set[str], budget: Budget) -> list[str]:
    return select_names(spec, list(CONFIGS), lambda c: row_key(c, budget, CONFIGS[c].kind) not in done)


def results_path(args, stem: str = "ft_quick") -> Path:
    return Path(args.out_dir) / f"{out_name(args, stem)}.json"


def out_name(args, stem: str = "ft_quick") -> str:
    """The table's file name: ``stem`` for SmolLM2-135M at ``quick``, else with model and protocol
    (bench_fused.py shares this with its own stem)."""
    if args.name:
        return args.name
    if args.model == "smollm2-135m" and args.protocol == "quick":
        return stem
    return f"{stem}_{model_slug(args.model)}_{slug(args.protocol)}"


def load_rows(args, stem: str = "ft_quick") -> list[dict[str, Any]]:
    return load_table(results_path(args, stem), {"model": args.model, "eval_protocol": args.protocol}, args.replace)


def order_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pos = {c: i for i, c in enumerate(CONFIGS)}
    return sorted(rows, key=lambda r: (pos.get(r["config"], len(pos)), r["key"] != r["config"], r["key"]))


def method_defaults_notes() -> list[str]:
    from sparse_runtime.adapters import FINETUNE_METHODS
    from sparse_runtime.losa import LoSAConfig

    notes = []
    for m in ("masked-lora", "lors", "dense-lora", "seft"):
        spec = FINETUNE_METHODS.get(m)
        acfg = spec.make_config(rank=RANK)
        d = dict(spec.train_defaults)
        extra = ""
        if hasattr(acfg, "effective_alpha"):
            s = acfg.scale_for(RANK)
            extra = f"alpha {acfg.effective_alpha():g} ({acfg.scaling}: s = {s:.3g})"
        if m == "lors":
            extra += f", init {acfg.init} from {acfg.init_samples} examples, grad_mode {acfg.grad_mode}"
        if m == "seft":
            extra = (f"K = rank*(in+out) with rank {acfg.rank} (SEFTConfig.rank: the LoRA rank-8 parameter "
                     f"equivalent, used as is), k = {acfg.update_every}, p0 = {acfg.drop_rate} {acfg.drop_schedule}, "
                     f"accumulation {acfg.accumulation_steps}, scope {acfg.scope}, resurrection {acfg.resurrection}, "
                     f"N:M mode {acfg.nm_mode}, init {acfg.init} ({acfg.init_samples} examples)")
        notes.append(f"{m} defaults (used unchanged): lr {d.get('lr')} {d.get('schedule')}, warmup "
                     f"{d.get('warmup_ratio', 0)}, min_lr {d.get('min_lr', 0)}, weight decay "
                     f"{d.get('weight_decay', 0)}, max grad norm 1.0 (engine); {extra}")
    lc = LoSAConfig()
    ld = FINETUNE_METHODS.get("losa").train_defaults
    notes.append(f"losa defaults (used unchanged): T = {lc.rounds}, cubic schedule, rank {lc.rank} mean with the "
                 f"{lc.rank_schedule} schedule (6..10 over the rounds), r in [{lc.r_min}, {lc.r_max}], alpha "
                 f"{lc.alpha:g}, dropout {lc.dropout}, {lc.prune_method} re-prune, max grad norm {lc.max_grad_norm}; "
                 f"lr {ld['lr']} {ld['schedule']}, warmup {ld['warmup_ratio']}, weight decay {ld['weight_decay']} with "
                 "a fresh optimiser and schedule per round; the total budget split evenly over the rounds")
    return notes


def save_table(args, rows: list[dict[str, Any]], invocation: list[str], t_run: float, verbose: bool = False) -> None:
    import sparse_runtime as sr
    from sparse_runtime.report import save_results

    proto = sr.get_protocol(args.protocol)

    budget = budget_of(args)
    rows = order_rows(rows)
    have = {r["key"] for r in rows}
    missing = [c for c in CONFIGS if c not in have]
    reduced = [r["key"] for r in rows if r.get("budget") == "reduced"]
    machines = sorted({r.get("machine", "?") for r in rows})
    for r in rows:
        r["wall min"] = round(r["wall s"] / 60.0, 1) if isinstance(r.get("wall s"), (int, float)) else None
    cmd = "python benchmarks/bench_ft_quick.py" + (f" --model {args.model}" if args.model != "smollm2-135m" else "") \
        + (f" --protocol {args.protocol}" if args.protocol != "quick" else "") \
        + (f" --name {args.name}" if args.name else "")
    notes = [
        "ft-quick (docs/protocols.md): C4 windows of 512 tokens (c4/c4_sample.jsonl, data seed 1: not the seed-0 "
        "calibration windows), 200 optimiser steps x 8 sequences (819,200 tokens), rank 8 or its parameter "
        f"equivalent, each method's own lr/schedule; quality = WikiText-2 `{args.protocol}` perplexity (ppl before "
        "= the pruned base, or the dense model for LoSA; ppl after merge = the merged sparse checkpoint)",
        f"bases: Wanda 50 %, 70 %, 2:4 (N:M = N zeros in every M) under `{args.protocol}` calibration "
        f"({proto.calib_samples} x {proto.calib_seqlen} C4 tokens, seed {proto.calib_seed}), cached and shared by "
        "every configuration; LoSA starts from the dense model and uses the same calibration windows",
        f"training: fp32, seed 0 (adapter init, data order), LM-head loss in checkpointed chunks of {args.loss_chunk} "
        "tokens for every method (LoSA through LoSAConfig.loss_chunk_tokens), one micro-batch per "
        f"step, no gradient checkpointing, torch threads {args.threads}",
        "equal trainable parameters: LoRA-style methods rank 8 on q/k/v/o/gate/up/down; SEFT K = 8(in+out) per layer "
        "(identical count); LoSA's per-layer ranks average 8 over the rounds (its trainable count is the "
        "steps-weighted mean over rounds)",
        *method_defaults_notes(),
        "dense-lora: merged densely, then re-pruned with the base mask (exact base sparsity and pattern); "
        "dense-lora-rewanda: the same adapter re-pruned by Wanda (quick calibration), keeping each row's zero count",
        "sparsity = base: nonzeros of every layer counted on the merged weights against the base manifest, N:M checked "
        "per group; SEFT may move the mask (resurrection) but keeps each layer's count; 'mask evolved' = resurrected "
        "weights / kept weights of the base",
        "peak train RSS = the training process's ru_maxrss at the end of training (model load included; merge and "
        "evaluation come after); the JSON also has the whole config process's peak (wait4); step s = median of the "
        "logged optimiser steps without the first; wall = the whole configuration (train, merge, 2 perplexities)",
        "machines (per row in the JSON, with load averages and the number of configurations that ran at once): "
        + "; ".join(machines),
    ]
    devices = sorted({r.get("device", "cpu") for r in rows})
    if any(d != "cpu" for d in devices):
        notes.append("on a GPU: training, pruning of the bases, LoSA and both perplexities run on the GPU, the merge on "
                     "the host CPU; peak train CUDA MB = torch.cuda.max_memory_allocated over the training loop alone "
                     "(weights, adapters, optimiser state, activations; no allocator slack; setup such as LoRS's "
                     "gradient-SVD init is before the loop: JSON train.peak_device_setup_mb); each step ends with a "
                     "device synchronise, so step s is the step's own time")
    if any((r.get("detail") or {}).get("tf32_training") for r in rows):
        notes.append("TF32: rows whose JSON has tf32_training = true trained with TF32 tensor-core matmuls (10-bit "
                     "mantissa inputs, fp32 accumulation; LoSA: its whole run incl. re-prunes); the bases and every "
                     "perplexity were computed in full fp32")
    shared = sorted({r.get("concurrent configs", 1) for r in rows if r.get("concurrent configs", 1) > 1})
    if shared:
        notes.append(f"up to {max(shared)} configurations ran at once on the same device (--jobs): perplexities, "
                     "sparsity and CUDA peaks are per process and unaffected; step s and wall are under that "
                     "sharing and compare only roughly across methods (a run alone is the clean figure)")

    if reduced:
        notes.append("REDUCED rows did NOT use the ft-quick budget (see 'budget used'); they are smoke or partial "
                     "runs, not comparable with ft-quick rows: " + ", ".join(reduced))
    if missing:
        notes.append("MISSING (no ft-quick row yet): " + ", ".join(missing) + f". Run one at a time: `{cmd} --configs "
                     "NAME` (or `--configs missing`); `--dry-run` prints the estimated cost")
    else:
        notes.append("complete: every configuration of the registry has an ft-quick row")
    notes.append(f"last invocation: {', '.join(invocation) or '-'} ({budget.flag} budget {budget.text}); wall "
                 f"{time.perf_counter() - t_run:.0f} s")
    title = f"Sparse fine-tuning repair at equal budget (ft-quick): {args.model}"
    protocol = (f"ft-quick fine-tuning (C4 512-token windows, seed 1, 200 x 8, rank 8 equiv.) + `{args.protocol}` "
                "perplexity" + ("; some rows REDUCED" if reduced else ""))
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stderr if verbose else devnull):  # it prints
        path = save_results(out_name(args), title, rows, protocol=protocol, model=args.model, notes=notes,
                            columns=COLUMNS, out_dir=args.out_dir,
                            extra={"bench": {"model": args.model, "eval_protocol": args.protocol, "missing": missing,
                                             "reduced": reduced}})
    print(f"saved {path} ({len(rows)} rows; {len(missing)} configurations missing)", flush=True)


def print_summary(args, rows: list[dict[str, Any]], ran: list[str]) -> None:
    from sparse_runtime.report import markdown_table

    if not rows:
        return
    cols = ["config", "budget used", "trainable params", "ppl before", "ppl after merge", "sparsity after",
            "sparsity = base", "peak train RSS MB", "step s (median)", "wall min", "mask evolved"]
    print(f"\n{results_path(args).with_suffix('.md')} ({args.protocol} perplexity; "
          "rows marked REDUCED are not ft-quick):")
    print(markdown_table(rows, cols))
    mine = [r["key"] for r in rows if r["key"] in ran]
    have = {r["key"] for r in rows}
    print("this invocation: " + (", ".join(mine) or "nothing new"))
    print("still missing (ft-quick): " + (", ".join(c for c in CONFIGS if c not in have) or "none"))


def dry_run(args, work: Work, rows: list[dict[str, Any]], names: list[str]) -> None:
    budget = budget_of(args)
    have = {r["key"]: r for r in rows}
    print(f"plan: model {args.model}, perplexity protocol {args.protocol}, budget {budget.text} ({budget.flag}), "
          f"work dir {work.root}, table {results_path(args)}")
    for b in BASES:
        info = work.base_info(b)
        print(f"  base {b:10s} " + (f"cached: sparsity {info['sparsity']:.4f}, ppl {info['ppl']:.3f}" if info
                                     else "not prepared yet (pruned and evaluated on first use)"))
    for line in method_defaults_notes():
        print("  " + line)
    total, planned = 0.0, set()
    print(f"\n{'configuration':28s} {'status':34s} {'estimate':>9s}  what")
    for name in (names or list(CONFIGS)):
        cfg = CONFIGS[name]
        key = row_key(name, budget, cfg.kind)
        r = have.get(key)
        status = (f"done ({r.get('date', '')[:10]})" if r else "missing")
        if r and name in names and not args.force:
            status += ", skipped (--force reruns)"
        run = (name in names and (not r or args.force)) if names else not r
        sec, src = estimate(cfg, budget, args, work, rows, planned if run else None)
        total += sec if run else 0.0
        print(f"{name:28s} {status:34s} {sec / 60:7.1f} m  {cfg.about}" + (" [will run]" if run and names else ""))
    what = "what --configs would run" if names else "every missing configuration"
    print(f"\nestimated total for {what}: {total / 3600:.2f} h (step time from {src} figures; each configuration "
          "is one invocation, e.g. --configs NAME; a loaded machine takes longer)")


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments every resumable fine-tuning table shares (this one and bench_fused.py): budget
    overrides, training knobs, device, parallel jobs, and the worker plumbing."""
    ap.add_argument("--steps", type=int, default=None, help="override the 200 steps (row flagged 'reduced')")
    ap.add_argument("--batch", type=int, default=None, help="override the 8 sequences per step (row flagged 'reduced')")
    ap.add_argument("--seq-len", type=int, default=None, help="override the 512-token windows (row flagged 'reduced')")
    ap.add_argument("--loss-chunk", type=int, default=1024, help="LM-head loss chunk (tokens; same for all methods)")
    ap.add_argument("--save-every", type=int, default=20, help="steps between resumable training checkpoints")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the workers")
    ap.add_argument("--device", default="cpu",
                    help="where training, base pruning, LoSA and perplexity run: cpu (default) or cuda[:N]; the merge "
                         "always runs on the host CPU")
    ap.add_argument("--tf32", action="store_true",
                    help="on a GPU: TF32 matmuls while training (LoSA: its whole run); evaluation stays full fp32")
    ap.add_argument("--jobs", type=int, default=1,
                    help="configurations run at once (each in its own process; for a GPU with room to spare: the "
                         "quality figures and CUDA peaks stay per process, step times share the device)")
    ap.add_argument("--log-dir", default=None, help="one log file per worker here instead of the terminal")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan, the status and the estimated cost; run nothing")
    ap.add_argument("--force", action="store_true", help="rerun configurations that already have a row")
    ap.add_argument("--replace", action="store_true", help="start the table over (default: merge rows into it)")
    ap.add_argument("--keep-merged", action="store_true", help="keep the merged checkpoints in the work dir")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--retrain", action="store_true", help=argparse.SUPPRESS)


def check_run_arguments(args) -> None:
    for k in ("steps", "batch", "seq_len"):
        v = getattr(args, k)
        if v is not None and v < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configurations:\n" + "\n".join(f"  {n:28s} {c.about}" for n, c in CONFIGS.items()))
    ap.add_argument("--configs", default=None, help="comma list of configuration names, patterns, 'missing' or 'all'")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--protocol", default="quick",
                    help="calibration of the bases and perplexity (quick; 'test' for smoke runs)")
    ap.add_argument("--name", default=None, help="result file name (default ft_quick for smollm2-135m/quick)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    add_run_arguments(ap)
    ap.add_argument("--merge", action="store_true", help="accepted for symmetry with the other benchmarks (default)")
    args = ap.parse_args()
    if args.worker:
        worker_main(args)
        return
    check_run_arguments(args)
    import torch

    torch.set_num_threads(args.threads)  # the header's "torch threads" = what the workers use
    budget = budget_of(args)
    work = Work(args.model, args.protocol)
    rows = load_rows(args)
    done = {r["key"] for r in rows}
    names = select(args.configs or ("all" if args.dry_run else None), done, budget)
    if args.dry_run:
        dry_run(args, work, rows, names if args.configs else [])
        return
    if not names:
        raise SystemExit("name the configurations to run: --configs NAME[,NAME...] | missing | all "
                         "(--dry-run lists them with their status and cost)")
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this PyTorch sees no CUDA device; use --device cpu")
    t_run = time.perf_counter()
    ran: list[str] = []
    failed: list[str] = []
    trained: set[str] = set()
    state = {"rows": rows, "done": done}
    table_lock = threading.Lock()

    def one(i: int, name: str) -> None:
        run_config(args, work, budget, i, names, name, state, table_lock, ran, failed, trained, t_run)

    run_queue(names, one, args.jobs)
    print_summary(args, order_rows(load_rows(args)), ran)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (their rows are missing; rerun them)")


def run_config(args, work: Work, budget: Budget, i: int, names: list[str], name: str, state: dict[str, Any],
               table_lock: threading.Lock, ran: list[str], failed: list[str], trained: set[str], t_run: float) -> None:
    """Prepare the base if needed, run one configuration in its own process, merge its row into the table."""
    cfg = CONFIGS[name]
    key = row_key(name, budget, cfg.kind)
    if key in state["done"] and not args.force:
        print(f"[{i}/{len(names)}] {name}: already in the table, skipped (--force reruns it)", flush=True)
        return
    sec, src = estimate(cfg, budget, args, work, state["rows"])
    print(f"[{i}/{len(names)}] {name} ({cfg.about}); budget {budget.text} ({budget.flag}); estimated "
          f"{sec / 60:.0f} min ({src})", flush=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        base = ensure_base(args, work, cfg.base)
        res, child_peak = None, None
        if cfg.kind != "eval":
            work.root.mkdir(parents=True, exist_ok=True)
            result = work.run_dir(cfg, budget) / f"result-{slug(name)}.json"
            result.unlink(missing_ok=True)
            tkey = f"{cfg.train_key()}-{budget.tag}"
            retrain = ["--retrain"] if args.force and tkey not in trained else []
            with work.lock(f"run-{tkey}"):
                rc, _, child_peak = spawn(args, ["config", "--config", name, "--result", str(result), *retrain])
            trained.add(tkey)
            if rc or not result.is_file():
                raise RuntimeError(f"worker exited with {rc}")
            res = json.loads(result.read_text())
    except (RuntimeError, OSError) as e:
        print(f"[{i}/{len(names)}] {name} FAILED: {e}", flush=True)
        failed.append(name)
        return
    wall = time.perf_counter() - t0
    row = make_row(cfg, budget, base, res, wall, child_peak, (round(load0, 2), round(os.getloadavg()[0], 2)),
                   args.device, args.jobs)
    with table_lock, work.lock("results"):
        rows = [r for r in load_rows(args) if r["key"] != row["key"]] + [row]
        args.replace = False  # from now on merge into what this invocation wrote
        state["rows"] = rows
        state["done"].add(row["key"])
        ran.append(row["key"])
        save_table(args, rows, ran, t_run)
    print(f"[{i}/{len(names)}] {name}: ppl {row['ppl before']:.3f} -> {row['ppl after merge']:.3f}, sparsity "
          f"{row['sparsity after']:.4f} ({row['sparsity = base']}), wall {wall / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
