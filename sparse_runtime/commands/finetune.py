"""``sparse-runtime finetune MODEL --method M ... --out DIR``: THE route for every fine-tuning method.

``lors`` (default), ``masked-lora``, ``dense-lora`` and ``seft`` train a mask-keeping adapter on a
pruned checkpoint and write the adapter (merge it with ``sparse-runtime merge DIR --out DIR2``, or
``--merge-to``); ``losa`` prunes the DENSE model progressively while it trains, and writes the merged
sparse checkpoint. Each method's own options are a group of their own (SEFT's in
:mod:`.seft`, LoSA's in :mod:`.losa`); an option given to a method it does not belong to is one
clear error, never silently ignored. Run under ``torchrun --nproc_per_node K`` for data parallel
training (gloo on CPU, nccl on GPU; not LoSA).
"""
from __future__ import annotations

from . import Command
from . import losa as losa_options
from . import seft as seft_options
from ._common import add_data_args, add_device_arg, add_model_args, add_out_args, check_device, check_output

LORA_METHODS = ("lors", "masked-lora", "dense-lora")
_ADAPTER_METHODS = (*LORA_METHODS, "seft")  # methods that train an adapter on a pruned checkpoint

# options that belong to some methods only: argparse dest -> (flag, the methods it applies to).
# Each defaults to None (= the method's default), so "given" is "not None".
_ONLY: dict[str, tuple[str, tuple[str, ...]]] = {
    "layer_rank": ("--layer-rank", LORA_METHODS),
    "init": ("--init", LORA_METHODS),
    "grad_mode": ("--grad-mode", ("lors",)),
    "init_samples": ("--init-samples", ("lors",)),
    "init_micro_batch": ("--init-micro-batch", ("lors",)),
    "alpha": ("--alpha", (*LORA_METHODS, "losa")),
    "dropout": ("--dropout", (*LORA_METHODS, "losa")),
    "mask_source": ("--mask-source", _ADAPTER_METHODS),
    "packing": ("--packing", _ADAPTER_METHODS),
    "eval_every": ("--eval-every", _ADAPTER_METHODS),
    "eval_examples": ("--eval-examples", _ADAPTER_METHODS),
    "eval_ppl": ("--eval-ppl", _ADAPTER_METHODS),
    "save_every": ("--save-every", _ADAPTER_METHODS),
    "resume": ("--resume", _ADAPTER_METHODS),
    "merge_to": ("--merge-to", _ADAPTER_METHODS),
    "reprune": ("--reprune", _ADAPTER_METHODS),
    **{dest: (f"--{dest.replace('_', '-')}", ("seft",)) for dest in seft_options.OPTIONS},
    **{dest: (flag, ("losa",)) for dest, flag in losa_options.FLAGS.items()},
}


def add_arguments(p):
    from ..adapters import FINETUNE_METHODS

    add_model_args(p)
    add_device_arg(p)
    add_data_args(p)
    add_out_args(p)
    g = p.add_argument_group("method and adapter")
    g.add_argument("--method", default="lors", choices=FINETUNE_METHODS.names(),
                   help="fine-tuning method (default lors; docs/finetuning.md); seft and losa take their own "
                        "option groups below")
    g.add_argument("--rank", type=int, default=8,
                   help="adapter rank r (default 8); seft: trainable deltas matched to it, K = r*(in+out); "
                        "losa: the mean per-layer rank")
    g.add_argument("--alpha", type=float, default=None,
                   help="LoRA scale alpha (LoRA methods and losa; default: the method's: lors r, losa 16, others 2r)")
    g.add_argument("--targets", default=None, help="comma-separated block linears (default: all seven projections)")
    g.add_argument("--mask-source", choices=["weights", "stored"], default=None,
                   help="adapter methods: recompute the mask M from W != 0, or store it (default: the method's)")
    g.add_argument("--dropout", type=float, default=None,
                   help="adapter dropout (masked-lora, dense-lora, losa; default: the method's)")
    lo = p.add_argument_group("LoRA (--method lors | masked-lora | dense-lora)")
    lo.add_argument("--layer-rank", action="append", default=None, metavar="NAME=R",
                    help="per-layer rank override (repeatable)")
    lo.add_argument("--init", choices=["kaiming", "gradient-svd"], default=None,
                    help="adapter initialisation (default: the method's; lors: gradient-svd)")
    lo.add_argument("--grad-mode", choices=["exact", "straight-through", "official"], default=None,
                    help="lors: exact masked gradient (default), unmasked straight-through, or the official code's")
    lo.add_argument("--init-samples", type=int, default=None,
                    help="lors: examples for the gradient-SVD init (default 128)")
    lo.add_argument("--init-micro-batch", type=int, default=None,
                    help="lors: examples per pass of that init (default 1; 0 = the training micro-batch; lower = lower "
                         "peak memory, same average)")
    seft_options.add_arguments(p)
    losa_options.add_arguments(p)
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, choices=["alpaca", "c4", "text"],
                   help="training data (default alpaca; losa: c4, the ft-quick protocol)")
    d.add_argument("--data-path", default=None, help="an Alpaca JSON or a text file instead of the shared set")
    d.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence (default 512)")
    d.add_argument("--packing", action="store_true", default=None, help="alpaca: pack examples into full windows")
    d.add_argument("--data-seed", type=int, default=None, help="c4 window seed (default 1, as ft-quick)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=None,
                   help="optimiser steps (default: one epoch; c4 needs it; losa: 200 in total, split over the rounds)")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per optimiser step over all processes (default 8)")
    t.add_argument("--micro-batch-size", type=int, default=None, help="sequences per forward (gradient accumulation)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's)")
    t.add_argument("--schedule", choices=["constant", "linear", "cosine"], default=None,
                   help="learning-rate schedule after the warmup (default: the method's)")
    t.add_argument("--warmup-ratio", type=float, default=None,
                   help="fraction of the steps spent warming the learning rate up (default: the method's)")
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: the method's)")
    t.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the gradient norm to this (default 1.0; losa 0.3, as the official code; 0: no clipping)")
    t.add_argument("--seed", type=int, default=0, help="seed of the adapter initialisation and dropout (default 0)")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, about a third more time)")
    t.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="training precision (default fp32; auto: bf16 where the device supports it)")
    t.add_argument("--loss-chunk", type=int, default=0,
                   help="LM-head loss in checkpointed chunks of N tokens (0: whole; same loss, less memory)")
    t.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 0: none)")
    t.add_argument("--eval-examples", type=int, default=None, help="held-out examples for the eval loss (default 0)")
    t.add_argument("--eval-ppl", action="store_true", default=None,
                   help="WikiText-2 perplexity (--protocol) at each evaluation")
    t.add_argument("--save-every", type=int, default=None, help="steps between resumable checkpoints (default 0: none)")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue the run in --out (latest checkpoint) or from CHECKPOINT")
    k = p.add_argument_group("distillation from the dense model (every method; docs/finetuning.md#distillation)")
    k.add_argument("--distill", choices=["none", "logits", "blocks", "both"], default=None,
                   help="add a distillation term: loss = (1-w) CE + w KD; logits: T^2 KL(teacher || model); blocks: "
                        "per-block output MSE normalised by the teacher's mean square (SquareHead); both: their sum "
                        "(default none)")
    k.add_argument("--distill-teacher", default=None, metavar="PATH",
                   help="the dense teacher (default: the dense model the checkpoint's manifest records; losa: the "
                        "dense input model)")
    k.add_argument("--distill-weight", type=float, default=None, help="w in [0, 1] (default 0.5)")
    k.add_argument("--distill-temperature", type=float, default=None,
                   help="softmax temperature T of the logit term, scaled by T^2 (default 1)")
    m = p.add_argument_group("merge (adapter methods)")
    m.add_argument("--merge-to", default=None, help="also merge the trained adapter into this checkpoint directory")
    m.add_argument("--reprune", default=None, choices=["wanda", "magnitude", "mask"],
                   help="how a merged dense-lora update is re-pruned (default wanda)")


def check_method_options(args) -> None:
    """One line for an option given to a method it does not belong to (before anything is loaded)."""
    from ..errors import ConfigError

    wrong = [flag for dest, (flag, methods) in _ONLY.items()
             if getattr(args, dest, None) is not None and args.method not in methods]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} do{'es' if len(wrong) == 1 else ''} not apply to --method "
                          f"{args.method}; drop {'it' if len(wrong) == 1 else 'them'} (`sparse-runtime finetune "
                          "--help` lists each method's options)")


def run(args) -> int:
    check_device(args.device)
    check_method_options(args)
    if args.method == "losa":  # LoSA prunes from the dense model in rounds and writes a checkpoint
        check_output(args.out, args.overwrite, inputs=[args.model, args.data_path])
        return losa_options.run(args)
    # --out: not the current directory nor the input, on a writable disk (an existing --out is the
    # engine's to judge: --overwrite / --resume), before the model is loaded
    check_output(args.out, overwrite=True, inputs=[args.model])
    if args.merge_to:  # the merged checkpoint's place is checked now too, not after the training
        check_output(args.merge_to, overwrite=args.overwrite, inputs=[args.model, args.out], flag="--merge-to")
    from ..adapters import parse_ranks
    from ..training import TrainConfig, finetune

    mgn = 1.0 if args.max_grad_norm is None else args.max_grad_norm
    cfg = TrainConfig(method=args.method, data=args.data or "alpaca", data_path=args.data_path, steps=args.steps,
                      batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                      packing=bool(args.packing), data_seed=args.data_seed, lr=args.lr, schedule=args.schedule,
                      warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, max_grad_norm=mgn or None,
                      seed=args.seed, gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
                      loss_chunk_tokens=args.loss_chunk, eval_every=args.eval_every or 0,
                      eval_examples=args.eval_examples or 0, eval_ppl=bool(args.eval_ppl), ppl_protocol=args.protocol,
                      save_every=args.save_every or 0, distill=args.distill or "none",
                      distill_teacher=args.distill_teacher,
                      distill_weight=0.5 if args.distill_weight is None else args.distill_weight,
                      distill_temperature=1.0 if args.distill_temperature is None else args.distill_temperature)
    cfg.validate()  # a bad distillation option is one line before the model is loaded
    if args.method == "seft":
        opts = seft_options.adapter_options(args)
    else:
        opts = {"rank": args.rank, "alpha": args.alpha, "mask_source": args.mask_source, "dropout": args.dropout,
                "init": args.init}
        if args.layer_rank:
            opts["ranks"] = parse_ranks(args.layer_rank)
        if args.targets:
            opts["targets"] = [t.strip() for t in args.targets.split(",") if t.strip()]
        if args.method == "lors":
            opts.update(grad_mode=args.grad_mode, init_samples=args.init_samples,
                        init_micro_batch=args.init_micro_batch)
    res, lm = finetune(args.model, args.out, cfg, opts, data_dir=args.data_dir, resume=args.resume or False,
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

            out, rep = merge_adapter_dir(args.out, args.merge_to, reprune=args.reprune or "wanda",
                                         overwrite=args.overwrite, data_dir=args.data_dir, protocol=args.protocol,
                                         dtype=args.dtype)
            print(f"merged into {out}: {rep.as_dict()}")
    return 0


COMMAND = Command("finetune", "fine-tune a sparse model, keeping its sparsity: lors, masked-lora, dense-lora, seft; "
                  "or losa, progressive pruning from the dense model", add_arguments, run)
