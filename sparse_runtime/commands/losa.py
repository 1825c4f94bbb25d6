"""``sparse-runtime losa DENSE --sparsity 0.7 --steps 200 --data c4 --out DIR``: LoSA from the dense
model (the same as ``sparse-runtime finetune DENSE --method losa ...``). See docs/losa.md."""
from __future__ import annotations

from . import Command
from ._common import add_data_args, add_device_arg, add_model_args, add_out_args, check_device, check_output


def add_arguments(p):
    from ..losa.cli import add_losa_arguments

    add_model_args(p)
    add_device_arg(p)
    add_data_args(p)
    add_out_args(p)
    add_losa_arguments(p)
    g = p.add_argument_group("adapter and training (total budget over all rounds)")
    g.add_argument("--rank", type=int, default=8, help="mean LoRA rank r (default 8)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 16: s = alpha / r = 2)")
    g.add_argument("--dropout", type=float, default=None, help="adapter dropout (default 0.1)")
    g.add_argument("--targets", default=None, help="comma-separated block linears (default: all seven)")
    g.add_argument("--data", default="c4", choices=["alpaca", "c4", "text"], help="training data (default c4: ft-quick)")
    g.add_argument("--data-path", default=None)
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--data-seed", type=int, default=None)
    g.add_argument("--steps", type=int, default=200, help="optimiser steps in total, split over the rounds (default 200)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None, help="default 2e-4 (official)")
    g.add_argument("--schedule", choices=["constant", "linear", "cosine"], default=None)
    g.add_argument("--warmup-ratio", type=float, default=None, help="default 0.3 (official)")
    g.add_argument("--weight-decay", type=float, default=None, help="default 0.001 (official)")
    g.add_argument("--max-grad-norm", type=float, default=0.3, help="default 0.3 (official)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--loss-chunk", type=int, default=0,
                   help="LM-head loss in checkpointed chunks of this many tokens (0: whole; same loss, less memory)")


def run(args) -> int:
    from ..losa.cli import run_from_args

    check_device(args.device)
    check_output(args.out, args.overwrite, inputs=[args.model, args.data_path])
    return run_from_args(args)


COMMAND = Command("losa", "LoSA: prune the dense model progressively while fine-tuning a masked, per-layer-rank LoRA",
                  add_arguments, run)
