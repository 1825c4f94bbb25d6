"""``sparse-runtime seft DIR --data c4 --steps N --out DIR2 [SEFT options]``: SEFT fine-tuning with
every SEFT option on the command line (``sparse-runtime finetune DIR --method seft`` works too, with
SEFT's defaults and ``--rank``); merge with ``sparse-runtime merge DIR2 --out DIR3``.

Takes all of ``finetune``'s data/training options plus the SEFT group below (docs/seft.md).
"""
from __future__ import annotations

from . import Command
from ._common import check_device, check_output
from .finetune import add_arguments as add_finetune_arguments


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    from ..errors import ConfigError

    raise ConfigError(f"expected true/false, got {text!r}")


def add_arguments(p):
    add_finetune_arguments(p)
    p.set_defaults(method="seft")
    g = p.add_argument_group("SEFT")
    g.add_argument("--density", type=float, default=None,
                   help="trainable deltas as a fraction of each layer's positions (default: matched to LoRA --rank, "
                        "K = rank*(in+out))")
    g.add_argument("--update-every", type=int, default=None, help="k: steps between evolution steps (default 60)")
    g.add_argument("--drop-rate", type=float, default=None, help="p0: initial drop fraction (default 0.2)")
    g.add_argument("--drop-schedule", choices=["cosine", "linear", "constant"], default=None)
    g.add_argument("--accumulation-steps", type=int, default=None, help="growth-window steps (default 5)")
    g.add_argument("--resurrection", type=_bool, default=None, metavar="true|false",
                   help="let growth reach pruned positions (default true)")
    g.add_argument("--scope", choices=["layer", "row", "global"], default=None,
                   help="re-pruning scope (default layer: keeps each layer's count, so any OWL/ATP allocation)")
    g.add_argument("--nm-mode", choices=["active", "group"], default=None,
                   help="N:M layers: grow only at kept weights (default) or re-prune per M-group")
    g.add_argument("--evolve", type=_bool, default=None, metavar="true|false",
                   help="false: fixed-topology sparse-delta fine-tune")
    g.add_argument("--seft-init", choices=["gradient", "random"], default=None, help="initial index set")
    g.add_argument("--seft-init-samples", type=int, default=None, help="examples for the gradient init (default 16)")
    g.add_argument("--optimizer-reset", choices=["seed", "zero"], default=None)
    g.add_argument("--grad-impl", choices=["chunked", "sampled"], default=None)


def run(args) -> int:
    import os

    from ..errors import ConfigError
    from ..training import TrainConfig, finetune

    if args.method != "seft":
        raise ConfigError("`sparse-runtime seft` trains SEFT only; use `sparse-runtime finetune` for other methods")
    if (args.grad_mode or args.init_samples or args.init_micro_batch or args.init or args.dropout or args.layer_rank
            or args.alpha):
        raise ConfigError("--grad-mode/--init/--init-samples/--init-micro-batch/--dropout/--layer-rank/--alpha are LoRA "
                          "options; SEFT uses --seft-init, --seft-init-samples, --density or --rank")
    cfg = TrainConfig(method="seft", data=args.data, data_path=args.data_path, steps=args.steps,
                      batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                      packing=args.packing, data_seed=args.data_seed, lr=args.lr, schedule=args.schedule,
                      warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                      max_grad_norm=args.max_grad_norm or None, seed=args.seed,
                      gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
                      loss_chunk_tokens=args.loss_chunk, eval_every=args.eval_every, eval_examples=args.eval_examples,
                      eval_ppl=args.eval_ppl, ppl_protocol=args.protocol, save_every=args.save_every)
    opts = {"rank": None if args.density is not None else args.rank, "density": args.density,
            "update_every": args.update_every, "drop_rate": args.drop_rate, "drop_schedule": args.drop_schedule,
            "accumulation_steps": args.accumulation_steps, "resurrection": args.resurrection, "scope": args.scope,
            "nm_mode": args.nm_mode, "evolve": args.evolve, "init": args.seft_init,
            "init_samples": args.seft_init_samples, "optimizer_reset": args.optimizer_reset,
            "grad_impl": args.grad_impl, "mask_source": args.mask_source}
    if args.targets:
        opts["targets"] = [t.strip() for t in args.targets.split(",") if t.strip()]
    check_device(args.device)
    check_output(args.out, overwrite=True, inputs=[args.model])  # see commands/finetune.py
    res, lm = finetune(args.model, args.out, cfg, opts, data_dir=args.data_dir, resume=args.resume,
                       overwrite=args.overwrite, dtype=args.dtype, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        last = f"{res.losses[-1]:.4f}" if res.losses else "n/a"
        print(f"fine-tuned seft: {res.steps} steps, {res.tokens} tokens, final loss {last}, "
              f"{res.trainable_parameters} trainable parameters, {res.seconds:.1f} s; adapter in {args.out}")
        if args.merge_to:
            from ..merge import merge_adapter_dir

            out, rep = merge_adapter_dir(args.out, args.merge_to, overwrite=args.overwrite, data_dir=args.data_dir,
                                         protocol=args.protocol, dtype=args.dtype)
            print(f"merged into {out}: {rep.as_dict()}")
    return 0


COMMAND = Command("seft", "SEFT fine-tuning (sparse deltas, evolving mask) with all its options; merge with `merge`",
                  add_arguments, run)
