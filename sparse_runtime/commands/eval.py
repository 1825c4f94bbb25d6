"""``sparse-runtime eval MODEL [--ppl] [--zeroshot TASKS|all] [--limit N] [--protocol quick|paper] [--json OUT]``.

Perplexity (WikiText-2, docs/protocols.md) and/or zero-shot accuracy (lm-eval-harness conventions) of a
model; prints tables and optionally writes everything as JSON. With neither ``--ppl`` nor
``--zeroshot`` it measures perplexity. Without ``--limit``, the zero-shot item count follows the
protocol: ``quick`` = the first 500 items of each task, ``paper`` = all items (printed either way).
"""
from __future__ import annotations

import json

from . import Command
from ._common import add_data_args, add_device_arg, add_model_args, check_device, check_output_file


def add_arguments(p):
    add_model_args(p)
    add_device_arg(p)
    add_data_args(p)
    p.add_argument("--ppl", action="store_true", help="WikiText-2 perplexity under --protocol")
    p.add_argument("--zeroshot", default=None, metavar="TASKS",
                   help="zero-shot tasks: all | wanda | atp | comma list of boolq,rte,hellaswag,winogrande,"
                        "arc_easy,arc_challenge,openbookqa,piqa")
    p.add_argument("--limit", type=int, default=None,
                   help="first N items per zero-shot task (default: from --protocol; quick=500, paper=all)")
    p.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size (default 8)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON to this file")
    p.add_argument("--stream", default="auto", choices=("auto", "on", "off"),
                   help="perplexity block by block from the safetensors shards, so memory holds one block: auto "
                        "(default: when the whole model would not fit comfortably), on, off")


def run(args) -> int:
    from ..errors import ConfigError
    from ..eval.zeroshot import evaluate_zeroshot, protocol_limit
    from ..data.zeroshot import resolve_tasks
    from ..models import load_model
    from ..protocols import get_protocol
    from ..report import markdown_table

    proto = get_protocol(args.protocol)  # fail on a bad protocol before loading anything
    check_device(args.device)
    check_output_file(args.json_out)
    do_ppl = args.ppl or not args.zeroshot
    limit = None
    if args.zeroshot:
        resolve_tasks(args.zeroshot)  # unknown task names fail before the model loads
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit must be a positive number of items per task, got {args.limit}")
        limit = args.limit if args.limit is not None else protocol_limit(proto.name)
    from ..models.streaming import stream_path

    path = stream_path(args.model, args.dtype, args.stream) if not args.device else None
    if path is not None:
        if args.zeroshot:
            raise ConfigError(f"{args.model} is read block by block (--stream {args.stream}), which perplexity "
                              "supports and zero-shot scoring does not yet: run --ppl alone, or --stream off on a "
                              "machine with the memory for the whole model")
        return _streamed_ppl(args, path, proto)
    lm = load_model(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
    if args.device:
        lm.model.to(args.device)
    out: dict = {"model": lm.source, "protocol": proto.name, "device": args.device or "cpu"}
    if do_ppl:
        from ..eval.perplexity import wikitext2_perplexity

        r = wikitext2_perplexity(lm.model, lm.tokenizer, proto.name, args.data_dir)
        out["perplexity"] = r.as_dict()
        print(f"WikiText-2 perplexity [{proto.name}: seqlen {r.seqlen}, {r.windows} windows]: {r.ppl:.4f} "
              f"({r.seconds:.1f} s)")
    if args.zeroshot:
        z = evaluate_zeroshot(lm.model, lm.tokenizer, tasks=args.zeroshot, limit=limit,
                              batch_size=args.batch_size, data_dir=args.data_dir)
        out["zeroshot"] = z.as_dict()
        print(f"zero-shot [{z.task_set}; {z.limit_note()}; {z.seconds:.1f} s]")
        print(markdown_table(z.table_rows()))
    if args.json_out:
        from ..manifest import write_file_atomic
        write_file_atomic(args.json_out, json.dumps(out, indent=1, default=str))
    return 0


def _streamed_ppl(args, path, proto) -> int:
    """WikiText-2 perplexity of a model read block by block (docs/scale.md#streaming)."""
    from ..data.text import tokenize_stream, wikitext2_text
    from ..eval.perplexity import streamed_perplexity
    from ..models.loading import _load_tokenizer
    from ..models.streaming import StreamedModel

    sm = StreamedModel(path, args.dtype, trust_remote_code=args.trust_remote_code)
    ids = tokenize_stream(_load_tokenizer(path, args.trust_remote_code), wikitext2_text(args.data_dir))
    r = streamed_perplexity(sm, ids, proto.eval_seqlen, proto.eval_windows, desc=f"wikitext2 ppl [{proto.name}]",
                            protocol=proto.name)
    out = {"model": str(args.model), "protocol": proto.name, "device": "cpu", "streamed": True,
           "perplexity": r.as_dict()}
    print(f"WikiText-2 perplexity [{proto.name}: seqlen {r.seqlen}, {r.windows} windows; streamed block by block]: "
          f"{r.ppl:.4f} ({r.seconds:.1f} s)")
    if args.json_out:
        from ..manifest import write_file_atomic
        write_file_atomic(args.json_out, json.dumps(out, indent=1, default=str))
    return 0


COMMAND = Command("eval", "WikiText-2 perplexity and zero-shot accuracy (lm-eval conventions) of a model",
                  add_arguments, run)
