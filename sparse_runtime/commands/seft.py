"""SEFT's options on ``sparse-runtime finetune DIR --method seft`` (no command of its own: one route
per method). SEFT trains sparse deltas with an evolving index set (docs/seft.md); merge with
``sparse-runtime merge``.
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected true/false, got {text!r}")


# argparse dest -> SEFTConfig field; every one defaults to None (= SEFT's own default)
OPTIONS = {"density": "density", "update_every": "update_every", "drop_rate": "drop_rate",
           "drop_schedule": "drop_schedule", "accumulation_steps": "accumulation_steps",
           "resurrection": "resurrection", "scope": "scope", "nm_mode": "nm_mode", "evolve": "evolve",
           "seft_init": "init", "seft_init_samples": "init_samples", "optimizer_reset": "optimizer_reset",
           "grad_impl": "grad_impl"}


def add_arguments(p) -> None:
    g = p.add_argument_group("SEFT (--method seft: sparse deltas, evolving index set; docs/seft.md)")
    g.add_argument("--density", type=float, default=None,
                   help="trainable deltas as a fraction of each layer's positions (default: matched to LoRA --rank, "
                        "K = rank*(in+out))")
    g.add_argument("--update-every", type=int, default=None, help="k: steps between evolution steps (default 60)")
    g.add_argument("--drop-rate", type=float, default=None, help="p0: initial drop fraction (default 0.2)")
    g.add_argument("--drop-schedule", choices=["cosine", "linear", "constant"], default=None,
                   help="how the drop fraction decays over training (default cosine)")
    g.add_argument("--accumulation-steps", type=int, default=None, help="growth-window steps (default 5)")
    g.add_argument("--resurrection", type=_bool, default=None, metavar="true|false",
                   help="let growth reach pruned positions (default true)")
    g.add_argument("--scope", choices=["layer", "row", "global"], default=None,
                   help="re-pruning scope (default layer: keeps each layer's count, so any OWL/ATP allocation)")
    g.add_argument("--nm-mode", choices=["active", "group"], default=None,
                   help="N:M layers: grow only at kept weights (default) or re-prune per M-group")
    g.add_argument("--evolve", type=_bool, default=None, metavar="true|false",
                   help="false: fixed-topology sparse-delta fine-tune (default true)")
    g.add_argument("--seft-init", choices=["gradient", "random"], default=None,
                   help="initial index set: largest accumulated gradients (default) or random")
    g.add_argument("--seft-init-samples", type=int, default=None, help="examples for the gradient init (default 16)")
    g.add_argument("--optimizer-reset", choices=["seed", "zero"], default=None,
                   help="optimiser state of a newly grown delta (default seed)")
    g.add_argument("--grad-impl", choices=["chunked", "sampled"], default=None,
                   help="how growth gradients of the dense weight are computed (default chunked)")


def adapter_options(args) -> dict[str, Any]:
    """SEFTConfig's options from the command line (None: SEFT's default)."""
    opts = {field: getattr(args, dest) for dest, field in OPTIONS.items()}
    opts["rank"] = None if args.density is not None else args.rank  # --density replaces the rank-matched count
    opts["mask_source"] = args.mask_source
    if args.targets:
        opts["targets"] = [t.strip() for t in args.targets.split(",") if t.strip()]
    return opts
