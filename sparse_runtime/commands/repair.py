"""``sparse-runtime repair DIR --method dsnot --out DIR2``: training-free repair of a pruned checkpoint."""
from __future__ import annotations

import json

from . import Command
from ._common import add_data_args, add_out_args, check_device, check_output, check_output_file


def _same_sign(text: str):
    from ..errors import ConfigError

    table = {"on": True, "off": False, "official": None}
    if text not in table:
        raise ConfigError(f"--same-sign takes on, off or official, got {text!r}")
    return table[text]


def add_arguments(p):
    from ..repair.dsnot import LAYER_SETS, THRESHOLD_UNITS

    p.add_argument("model", help="a pruned sparse-runtime checkpoint directory (with its sparsity manifest)")
    p.add_argument("--method", default="dsnot", help="repair method: dsnot (default)")
    p.add_argument("--dense", default=None, help="the dense model (default: the manifest's dense_source)")
    add_out_args(p)
    add_data_args(p)
    p.add_argument("--nsamples", type=int, default=None, help="calibration samples (default: the protocol's)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration length (default: the protocol's)")
    p.add_argument("--device", default=None, help="compute device for the pass (e.g. cuda)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--eval-ppl", action="store_true",
                   help="also measure WikiText-2 perplexity (--protocol) before and after the repair")
    d = p.add_argument_group("DSnoT options (defaults: paper values; see docs/dsnot.md)")
    d.add_argument("--official", action="store_true",
                   help="the released code's behaviour (token-sum threshold, attention only, overshoot allowed); "
                        "the options below override it")
    d.add_argument("--max-cycles", type=int, default=None, help="most swaps per row (50)")
    d.add_argument("--threshold", type=float, default=None, help="stop a row once |e_r| <= this (0.1)")
    d.add_argument("--threshold-unit", default=None, choices=THRESHOLD_UNITS,
                   help="initial (default: fraction of the row's initial error), token_sum (official), per_token, output_rms")
    d.add_argument("--var-power", type=float, default=None, help="power of the variance in the growth score (1)")
    d.add_argument("--var-floor", type=float, default=None, help="variance floor, relative to the mean variance (1e-6)")
    d.add_argument("--layers", default=None, choices=LAYER_SETS, help="sublayers to refine (all)")
    d.add_argument("--same-sign", default=None, help="on (default), off, or official (off unstructured, on N:M)")
    d.add_argument("--no-require-decrease", action="store_true", help="accept swaps that raise |e_r| (official)")


def run(args) -> int:
    from ..repair.dsnot import make_config
    from ..stages.repair import REPAIR_METHODS

    REPAIR_METHODS.get(args.method)  # unknown method: a clear error before any work
    check_device(args.device)
    check_output(args.out, args.overwrite, inputs=[args.model, args.dense])
    check_output_file(args.json_out)
    opts = {k: v for k, v in (("max_cycles", args.max_cycles), ("threshold", args.threshold),
                              ("threshold_unit", args.threshold_unit), ("var_power", args.var_power),
                              ("var_floor", args.var_floor), ("layers", args.layers)) if v is not None}
    if args.same_sign is not None:
        opts["same_sign"] = _same_sign(args.same_sign)
    if args.no_require_decrease:
        opts["require_decrease"] = False
    if args.official:
        opts["preset"] = "official"
    cfg = make_config(opts)
    from ..repair.dsnot import repair_dsnot_checkpoint

    rep = repair_dsnot_checkpoint(args.model, args.out, cfg, dense=args.dense, overwrite=args.overwrite,
                                  data_dir=args.data_dir, protocol=args.protocol, nsamples=args.nsamples,
                                  seqlen=args.seqlen, dtype=args.dtype, device=args.device)
    s, t = rep.summary, rep.timing
    print(f"dsnot: {s['swaps']} swaps in {s['rows_changed']} of {s['rows']} rows over {s['layers']} layers; "
          f"mean |e_r| {s['mean_abs_error_before']:.4g} -> {s['mean_abs_error_after']:.4g}; "
          f"DSnoT {t['dsnot_s']:.2f} s, calibration forwards {t['calibration_forward_s']:.2f} s, total {t['total_s']:.1f} s; "
          f"wrote {rep.checkpoint} (dense weights from {rep.dense_source})")
    ppl = _perplexities(args) if args.eval_ppl else None
    print(what_changed(rep, args.model, ppl))
    if args.json_out:
        from ..manifest import write_file_atomic
        write_file_atomic(args.json_out, json.dumps(rep.as_dict(), indent=1, default=str))
    return 0


def _perplexities(args) -> tuple:
    """WikiText-2 perplexity of the input and of the repaired checkpoint (same protocol, same data)."""
    from ..eval.perplexity import wikitext2_perplexity
    from ..models import load_model

    out = []
    for spec in (args.model, args.out):
        lm = load_model(spec, args.dtype)
        out.append(wikitext2_perplexity(lm.model, lm.tokenizer, args.protocol, args.data_dir))
        del lm
    return tuple(out)


def what_changed(rep, before_dir, ppl=None) -> str:
    """Before/after in one small table, so the user sees whether the model got better: the
    calibration output error DSnoT lowers, the sparsity it must keep, and (``--eval-ppl``) the
    perplexity that decides."""
    from ..manifest import read_manifest
    from ..report import markdown_table

    s = rep.summary
    e0, e1 = s["mean_abs_error_before"], s["mean_abs_error_after"]
    rows = [{"": "mean calibration output error per row, abs(e_r)", "before": e0, "after": e1,
             "change": f"{(e1 / e0 - 1) * 100:+.1f} %" if e0 else ""},
            {"": "sparsity (measured)", "before": read_manifest(before_dir).total_measured,
             "after": read_manifest(rep.checkpoint).total_measured, "change": "kept"},
            {"": "masks", "before": "", "after": "", "change": f"{s['swaps']} swaps in {s['rows_changed']} of "
                                                               f"{s['rows']} rows"}]
    if ppl:
        a, b = ppl
        rows.append({"": f"WikiText-2 perplexity ({b.protocol}: {b.windows} x {b.seqlen} tokens)", "before": a.ppl,
                     "after": b.ppl, "change": f"{(b.ppl / a.ppl - 1) * 100:+.2f} %"})
    else:
        rows.append({"": "perplexity", "before": "", "after": "", "change": "not measured (--eval-ppl)"})
    return markdown_table(rows).rstrip("\n")


def _add(p):
    add_arguments(p)
    p.add_argument("--json", dest="json_out", default=None, help="also write the repair report as JSON")


COMMAND = Command("repair", "training-free repair of a pruned checkpoint (DSnoT), keeping its sparsity exactly",
                  _add, run)
