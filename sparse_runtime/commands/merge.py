"""``sparse-runtime merge ADAPTER_DIR --out DIR``: fold a fine-tuned adapter into exact sparse weights."""
from __future__ import annotations

from . import Command
from ._common import add_data_args, add_out_args, check_output


def add_arguments(p):
    p.add_argument("adapter", help="adapter directory written by `sparse-runtime finetune`")
    p.add_argument("--base", default=None, help="base model (default: the one recorded in the adapter)")
    p.add_argument("--reprune", default="wanda", choices=["wanda", "magnitude", "mask"],
                   help="dense-lora only: how to re-prune the dense merge (LoRA*); default wanda")
    p.add_argument("--dtype", default="float32", help="dtype of the merged checkpoint (computed in fp32, cast last)")
    p.add_argument("--eval-ppl", action="store_true", help="print WikiText-2 perplexity of the merged model")
    add_data_args(p)
    add_out_args(p)


def run(args) -> int:
    from ..merge import merge_adapter_dir

    check_output(args.out, args.overwrite, inputs=[args.adapter, args.base])
    out, rep = merge_adapter_dir(args.adapter, args.out, base=args.base, reprune=args.reprune,
                                 overwrite=args.overwrite, data_dir=args.data_dir, protocol=args.protocol,
                                 dtype=args.dtype)
    print(summary_table(rep, out))
    if args.eval_ppl:
        from ..eval.perplexity import wikitext2_perplexity
        from ..models import load_model

        lm = load_model(out, args.dtype)
        r = wikitext2_perplexity(lm.model, lm.tokenizer, args.protocol, args.data_dir)
        print(f"wikitext2 ppl [{r.protocol}, seqlen {r.seqlen}, {r.windows} windows]: {r.ppl:.3f}")
    return 0


def summary_table(rep, out) -> str:
    """What the user needs to trust the merge, one row each: sparsity (target, measured), whether
    the masks and logits were verified, and where the checkpoint is (the full report is in the
    checkpoint's manifest history)."""
    from ..manifest import read_manifest
    from ..report import markdown_table

    d = rep.as_dict()
    man = read_manifest(out)
    target = man.total_target
    ranks = ", ".join(str(r) for r in d["ranks"])
    if "mask_evolution" in d:  # SEFT: the mask moved during training, its nonzero counts did not
        masks = "evolved in training; nonzero counts (and any N:M pattern) verified"
        logits = f"max abs diff {rep.max_abs_logit_diff:.3g} against the adapter model, verified"
    elif rep.reprune is None:
        masks = f"unchanged in every merged layer ({d['layers']}), verified"
        logits = f"max abs diff {rep.max_abs_logit_diff:.3g} against the adapter model, verified"
    else:
        masks = f"re-pruned with {rep.reprune} (dense-lora: the merge is dense first), nonzero counts verified"
        logits = f"max abs diff {rep.max_abs_logit_diff:.3g} against the adapter model (changes with the re-prune)"
    rows = [
        {"merged": "adapter", "result": f"{rep.method}, {d['layers']} layers" + (f", rank {ranks}" if ranks else "")},
        {"merged": "sparsity", "result": (f"target {target:.4f}, " if target is not None else "")
                                         + f"measured {man.total_measured:.4f}"},
        {"merged": "masks / N:M", "result": masks},
        {"merged": "logits", "result": logits},
    ]
    if rep.kept_zero_fixups:
        rows.append({"merged": "kept weights that summed to 0",
                     "result": f"{rep.kept_zero_fixups} set to the smallest normal value (mask kept exact)"})
    if "mask_evolution" in d:
        ev = d["mask_evolution"].values()
        rows.append({"merged": "mask evolution", "result": f"{sum(v['resurrected'] for v in ev)} weights resurrected, "
                                                           f"{sum(v['newly_pruned'] for v in ev)} newly pruned"})
    rows.append({"merged": "checkpoint", "result": str(out)})
    return markdown_table(rows).rstrip("\n")


COMMAND = Command("merge", "merge a fine-tuned adapter into exact sparse weights (sparsity and N:M verified)",
                  add_arguments, run)
