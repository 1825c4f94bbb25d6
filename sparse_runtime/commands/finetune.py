"""``sparse-runtime finetune DIR --method lors --data alpaca --steps N --out DIR2``.

Trains a mask-keeping adapter on a pruned checkpoint and writes the adapter (merge it with
``sparse-runtime merge DIR2 --out DIR3``). Run under ``torchrun --nproc_per_node K`` for data
parallel training (gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

from . import Command
from ._common import add_data_args, add_device_arg, add_model_args, add_out_args, check_device, check_output


def add_arguments(p):
    from ..adapters import FINETUNE_METHODS
    from ..losa.cli import add_losa_arguments  # registers "losa" (issue 8)

    add_model_args(p)
    add_device_arg(p)
    add_data_args(p)
    add_out_args(p)
    g = p.add_argument_group("method")
    g.add_argument("--method", default="lors", choices=FINETUNE_METHODS.names(), help="fine-tuning method (default lors)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the method's; lors: rank, others: 2*rank)")
    g.add_argument("--layer-rank", action="append", default=[], metavar="NAME=R", help="per-layer rank override (repeatable)")
    g.add_argument("--targets", default=None, help="comma-separated block linears (default: all seven projections)")
    g.add_argument("--mask-source", choices=["weights", "stored"], default=None, help="recompute M from W != 0, or store it")
    g.add_argument("--grad-mode", choices=["exact", "straight-through", "official"], default=None,
                   help="lors: exact masked gradient (default), unmasked straight-through, or the official code's")
    g.add_argument("--init", choices=["kaiming", "gradient-svd"], default=None, help="adapter initialisation")
    g.add_argument("--init-samples", type=int, default=None, help="lors: examples for the gradient-SVD init (default 128)")
    g.add_argument("--init-micro-batch", type=int, default=None,
                   help="lors: examples per pass of that init (default: the training micro-batch; lower = lower peak memory)")
    g.add_argument("--dropout", type=float, default=None, help="adapter dropout (masked/dense LoRA)")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="alpaca", choices=["alpaca", "c4", "text"], help="training data (default alpaca)")
    d.add_argument("--data-path", default=None, help="an Alpaca JSON or a text file instead of the shared set")
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--packing", action="store_true", help="alpaca: pack examples into full windows")
    d.add_argument("--data-seed", type=int, default=None, help="c4 window seed (default 1, as ft-quick)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=None, help="optimiser steps (default: one epoch; c4 needs it)")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per optimiser step over all processes")
    t.add_argument("--micro-batch-size", type=int, default=None, help="sequences per forward (gradient accumulation)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's)")
    t.add_argument("--schedule", choices=["constant", "linear", "cosine"], default=None)
    t.add_argument("--warmup-ratio", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    t.add_argument("--loss-chunk", type=int, default=0, help="LM-head loss in checkpointed chunks of N tokens")
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--eval-examples", type=int, default=0, help="held-out examples for the eval loss")
    t.add_argument("--eval-ppl", action="store_true", help="WikiText-2 perplexity (--protocol) at each evaluation")
    t.add_argument("--save-every", type=int, default=0, help="steps between resumable checkpoints")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out (latest checkpoint) or from CHECKPOINT")
    t.add_argument("--merge-to", default=None, help="also merge the trained adapter into this checkpoint directory")
    t.add_argument("--reprune", default="wanda", choices=["wanda", "magnitude", "mask"], help="dense-lora merge")
    add_losa_arguments(p)


def run(args) -> int:
    check_device(args.device)
    if args.method == "losa":  # LoSA prunes from the dense model in rounds: its own loop (issue 8)
        from ..losa.cli import run_from_args

        return run_from_args(args)
    # --out: not the current directory nor the input, on a writable disk (an existing --out is the
    # engine's to judge: --overwrite / --resume), before the model is loaded
    check_output(args.out, overwrite=True, inputs=[args.model])
    if args.merge_to:  # the merged checkpoint's place is checked now too, not after the training
        check_output(args.merge_to, overwrite=args.overwrite, inputs=[args.model, args.out], flag="--merge-to")
    from ..adapters import parse_ranks
    from ..training import TrainConfig, finetune

    cfg = TrainConfig(method=args.method, data=args.data, data_path=args.data_path, steps=args.steps,
                      batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                      packing=args.packing, data_seed=args.data_seed, lr=args.lr, schedule=args.schedule,
                      warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                      max_grad_norm=args.max_grad_norm or None, seed=args.seed,
                      gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
                      loss_chunk_tokens=args.loss_chunk, eval_every=args.eval_every, eval_examples=args.eval_examples,
                      eval_ppl=args.eval_ppl, ppl_protocol=args.protocol, save_every=args.save_every)
    opts = {"rank": args.rank, "alpha": args.alpha, "mask_source": args.mask_source, "dropout": args.dropout,
            "init": args.init}
    if args.layer_rank:
        opts["ranks"] = parse_ranks(args.layer_rank)
    if args.targets:
        opts["targets"] = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.method == "lors":
        opts.update(grad_mode=args.grad_mode, init_samples=args.init_samples, init_micro_batch=args.init_micro_batch)
    elif args.grad_mode or args.init_samples or args.init_micro_batch:
        from ..errors import ConfigError

        raise ConfigError("--grad-mode, --init-samples and --init-micro-batch apply to --method lors only")
    res, lm = finetune(args.model, args.out, cfg, opts, data_dir=args.data_dir, resume=args.resume,
                       overwrite=args.overwrite, dtype=args.dtype, device=args.device)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        last = f"{res.losses[-1]:.4f}" if res.losses else "n/a"
        print(f"fine-tuned {args.method}: {res.steps} steps, {res.tokens} tokens, final loss {last}, "
              f"{res.trainable_parameters} trainable parameters, {res.seconds:.1f} s; adapter in {args.out}")
        for ev in res.evals:
            print("eval:", ev)
        if args.merge_to:
            from ..merge import merge_adapter_dir

            out, rep = merge_adapter_dir(args.out, args.merge_to, reprune=args.reprune, overwrite=args.overwrite,
                                         data_dir=args.data_dir, protocol=args.protocol, dtype=args.dtype)
            print(f"merged into {out}: {rep.as_dict()}")
    return 0


COMMAND = Command("finetune", "fine-tune a sparse model, keeping its sparsity (lors, masked-lora, dense-lora, seft, losa)",
                  add_arguments, run)
