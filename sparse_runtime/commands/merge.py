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
    print(f"merged {rep.method} into {out}: {rep.as_dict()}")
    if args.eval_ppl:
        from ..eval.perplexity import wikitext2_perplexity
        from ..models import load_model

        lm = load_model(out, args.dtype)
        r = wikitext2_perplexity(lm.model, lm.tokenizer, args.protocol, args.data_dir)
        print(f"wikitext2 ppl [{r.protocol}, seqlen {r.seqlen}, {r.windows} windows]: {r.ppl:.3f}")
    return 0


COMMAND = Command("merge", "merge a fine-tuned adapter into exact sparse weights (sparsity and N:M verified)",
                  add_arguments, run)
