"""Command-line glue shared by ``sparse-runtime losa`` and ``sparse-runtime finetune --method losa``."""
from __future__ import annotations

from ..errors import ConfigError


def add_losa_arguments(p) -> None:
    """LoSA's own options (the training options are the finetune command's)."""
    g = p.add_argument_group("LoSA (--method losa: progressive pruning from the dense model)")
    g.add_argument("--sparsity", type=float, default=None, help="LoSA: final mean sparsity S in [0, 1)")
    g.add_argument("--rounds", type=int, default=5, help="LoSA: rounds T (default 5)")
    g.add_argument("--prune-method", default="wanda", help="LoSA: re-prune method (wanda | sparsegpt | any registered)")
    g.add_argument("--prune-option", action="append", default=[], metavar="KEY=VALUE",
                   help="LoSA: an option of the re-prune method (repeatable; e.g. percdamp=0.05 for sparsegpt)")
    g.add_argument("--allocation", choices=["rmi", "atp", "owl", "uniform"], default="rmi",
                   help="LoSA: per-layer sparsity each round (default rmi: RMI + the paper's LP)")
    g.add_argument("--delta", type=float, default=None, help="LoSA: LP half-width (default: a function of s_t)")
    g.add_argument("--rmi-features", choices=["outputs", "inputs"], default="outputs",
                   help="LoSA: RMI on block outputs (default) or inputs (official code)")
    g.add_argument("--rmi-samples", type=int, default=None, help="LoSA: calibration samples for RMI (default <= 64)")
    g.add_argument("--refine-dsnot", action="store_true", help="LoSA: DSnoT inside each re-prune")
    g.add_argument("--from-pruned", action="store_true",
                   help="LoSA: start from an already pruned checkpoint (flat schedule; a deviation from the paper)")
    g.add_argument("--rank-schedule", choices=["rising", "constant"], default="rising",
                   help="LoSA: mean rank per round (rising: r-2..r+2 for T=5, as the code)")
    g.add_argument("--r-max", type=int, default=16, help="LoSA: largest per-layer rank (default 16)")
    g.add_argument("--calib-samples", type=int, default=None, help="LoSA: calibration windows (default: protocol's)")
    g.add_argument("--round-steps", default=None, help="LoSA: comma-separated steps per round (default: even split)")


def config_from_args(args):
    from .config import LoSAConfig

    if args.sparsity is None:
        raise ConfigError("LoSA needs --sparsity S (the final mean sparsity, in [0, 1))")
    if getattr(args, "steps", None) is None:
        raise ConfigError("LoSA needs --steps N: the optimiser steps IN TOTAL, split over the rounds "
                          "(ft-quick: 200 with --batch-size 8 --data c4)")
    if getattr(args, "layer_rank", None):
        raise ConfigError("--layer-rank does not apply to LoSA: it allocates ranks per layer from reconstruction errors")
    if getattr(args, "resume", False):
        raise ConfigError("--resume is not supported by LoSA's round loop; rerun it")
    round_steps = None
    if args.round_steps:
        try:
            round_steps = [int(x) for x in str(args.round_steps).split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--round-steps must be comma-separated integers, got {args.round_steps!r}") from None
    targets = None
    if getattr(args, "targets", None):
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    from ..options import parse_options

    kw = dict(sparsity=args.sparsity, rounds=args.rounds, prune_method=args.prune_method,
              prune_options=parse_options(getattr(args, "prune_option", None), "--prune-option"),
              allocation=args.allocation,
              delta=args.delta, rmi_features=args.rmi_features, rmi_samples=args.rmi_samples,
              refine="dsnot" if args.refine_dsnot else None, from_pruned=args.from_pruned,
              rank_schedule=args.rank_schedule, r_max=args.r_max, nsamples=args.calib_samples,
              protocol=getattr(args, "protocol", None), rank=args.rank, targets=targets,
              data=args.data, data_path=args.data_path, steps=args.steps, round_steps=round_steps,
              train_batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
              data_seed=args.data_seed, lr=args.lr, lr_schedule=args.schedule, warmup_ratio=args.warmup_ratio,
              weight_decay=args.weight_decay, seed=args.seed, precision=args.precision,
              gradient_checkpointing=args.gradient_checkpointing,
              loss_chunk_tokens=getattr(args, "loss_chunk", 0), device=getattr(args, "device", None))
    if args.alpha is not None:
        kw["alpha"] = args.alpha
    if getattr(args, "dropout", None) is not None:
        kw["dropout"] = args.dropout
    if getattr(args, "max_grad_norm", None) is not None:
        kw["max_grad_norm"] = args.max_grad_norm or None
    cfg = LoSAConfig(**kw)
    cfg.validate()
    return cfg


def run_from_args(args) -> int:
    from .rounds import run_losa

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
