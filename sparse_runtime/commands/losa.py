"""LoSA's options on ``sparse-runtime finetune DENSE --method losa --sparsity 0.7 --out DIR`` (no
command of its own: one route per method). LoSA prunes the DENSE model progressively while it
fine-tunes a masked, per-layer-rank LoRA, and writes the merged sparse checkpoint (docs/losa.md).
The method itself is :mod:`sparse_runtime.losa`; this module is only its command line.
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError

# the LoSA-only flags (argparse dest -> flag); each defaults to None (= LoSAConfig's default)
FLAGS = {"sparsity": "--sparsity", "rounds": "--rounds", "prune_method": "--prune-method",
         "prune_option": "--prune-option", "allocation": "--allocation", "delta": "--delta",
         "rmi_features": "--rmi-features", "rmi_samples": "--rmi-samples", "refine_dsnot": "--refine-dsnot",
         "from_pruned": "--from-pruned", "rank_schedule": "--rank-schedule", "r_max": "--r-max",
         "calib_samples": "--calib-samples", "round_steps": "--round-steps"}


def add_arguments(p) -> None:
    """LoSA's own options (the adapter, data and training options are ``finetune``'s)."""
    from ..losa.config import LOSA_ALLOCATIONS

    g = p.add_argument_group("LoSA (--method losa: progressive pruning from the DENSE model; docs/losa.md)")
    g.add_argument("--sparsity", type=float, default=None, help="final mean sparsity S in [0, 1) (required)")
    g.add_argument("--rounds", type=int, default=None, help="rounds T (default 5)")
    g.add_argument("--prune-method", default=None, help="re-prune method each round: wanda (default) | sparsegpt | "
                                                        "any registered pruner")
    g.add_argument("--prune-option", action="append", default=None, metavar="KEY=VALUE",
                   help="an option of the re-prune method (repeatable; e.g. percdamp=0.05 for sparsegpt)")
    g.add_argument("--allocation", choices=list(LOSA_ALLOCATIONS), default=None,
                   help="registered allocation giving each block its sparsity every round (default rmi: RMI + the "
                        "paper's LP)")
    g.add_argument("--delta", type=float, default=None, help="rmi: the LP's half-width (default: a function of s_t)")
    g.add_argument("--rmi-features", choices=["outputs", "inputs"], default=None,
                   help="rmi: CKA on block outputs (default) or inputs (official code)")
    g.add_argument("--rmi-samples", type=int, default=None, help="rmi: calibration samples for the Gram matrices "
                                                                 "(default min(64, calibration windows))")
    g.add_argument("--refine-dsnot", action="store_true", default=None, help="DSnoT inside each re-prune")
    g.add_argument("--from-pruned", action="store_true", default=None,
                   help="start from an already pruned checkpoint (flat schedule; a deviation from the paper)")
    g.add_argument("--rank-schedule", choices=["rising", "constant"], default=None,
                   help="mean rank per round (default rising: r-2..r+2 for T=5, as the official code)")
    g.add_argument("--r-max", type=int, default=None, help="largest per-layer rank (default 16)")
    g.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: the protocol's)")
    g.add_argument("--round-steps", default=None,
                   help="comma-separated optimiser steps per round (default: --steps split evenly)")


def config_from_args(args):
    """The validated :class:`~sparse_runtime.losa.LoSAConfig` of a ``finetune --method losa`` command
    line; options left out take LoSA's defaults (c4 data, 200 steps in total, max-grad-norm 0.3)."""
    from ..losa.config import LoSAConfig
    from ..options import parse_options

    if args.sparsity is None:
        raise ConfigError("--method losa needs --sparsity S (the final mean sparsity, in [0, 1))")
    round_steps = None
    if args.round_steps:
        try:
            round_steps = [int(x) for x in str(args.round_steps).split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--round-steps must be comma-separated integers, got {args.round_steps!r}") from None
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    kw: dict[str, Any] = dict(
        sparsity=args.sparsity, rounds=args.rounds, prune_method=args.prune_method,
        prune_options=parse_options(args.prune_option or [], "--prune-option"), allocation=args.allocation,
        delta=args.delta, rmi_features=args.rmi_features, rmi_samples=args.rmi_samples,
        refine="dsnot" if args.refine_dsnot else None, from_pruned=args.from_pruned,
        rank_schedule=args.rank_schedule, r_max=args.r_max, nsamples=args.calib_samples, protocol=args.protocol,
        rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets, data=args.data,
        data_path=args.data_path, steps=args.steps, round_steps=round_steps, train_batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, data_seed=args.data_seed, lr=args.lr,
        lr_schedule=args.schedule, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, seed=args.seed,
        precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
        loss_chunk_tokens=args.loss_chunk, device=args.device, distill=args.distill,
        distill_teacher=args.distill_teacher, distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature)
    kw = {k: v for k, v in kw.items() if v is not None}  # left out: LoSAConfig's default
    if args.max_grad_norm is not None:
        kw["max_grad_norm"] = args.max_grad_norm or None  # 0: no clipping
    cfg = LoSAConfig(**kw)
    cfg.validate()
    return cfg


def run(args) -> int:
    """Run LoSA from a parsed ``finetune --method losa`` command line and print one line per round."""
    from ..losa.rounds import run_losa

    cfg = config_from_args(args)
    res = run_losa(args.model, args.out, cfg, data_dir=args.data_dir, overwrite=args.overwrite, dtype=args.dtype)
    for r in res.rounds:
        print(f"round {r.round}: target {r.target:.4f}, measured {r.measured_mean:.4f}, ranks "
              f"{min(r.ranks)}..{max(r.ranks)} (total {sum(r.ranks)}), steps {r.steps}, loss {r.final_loss}")
    t = res.timing
    print(f"LoSA done: sparsity {res.sparsity_measured:.4f}; RMI {t['rmi_s']:.1f} s, allocation {t['allocation_s']:.2f} s, "
          f"pruning {t['prune_s']:.1f} s, fine-tuning {t['finetune_s']:.1f} s, total {t['total_s']:.1f} s; "
          f"peak RSS {res.peak_rss_mb:.0f} MB; checkpoint {res.checkpoint}")
    return 0
