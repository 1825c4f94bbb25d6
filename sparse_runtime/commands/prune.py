"""``sparse-runtime prune MODEL --method wanda --sparsity 0.7 [--allocation atp] --out DIR``."""
from __future__ import annotations

from . import Command
from ._common import add_data_args, add_model_args, add_out_args, check_device, check_output


def _option(text: str):
    """KEY=VALUE for --refine-option; the value is read as YAML (numbers, true/false, strings)."""
    import yaml

    from ..errors import ConfigError

    if "=" not in text:
        raise ConfigError(f"--refine-option takes KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def add_arguments(p):
    add_model_args(p)
    g = p.add_argument_group("method")
    g.add_argument("--method", default="wanda", help="magnitude | wanda (default) | sparsegpt")
    g.add_argument("--sparsity", type=float, default=None,
                   help="fraction of zeros in [0, 1) (implied by --structure N:M)")
    g.add_argument("--structure", default="unstructured",
                   help="unstructured (default) or N:M = N ZEROS in every M inputs of a row (2:4, 4:8)")
    g.add_argument("--per-row", action="store_true", help="magnitude: per-row threshold (default per matrix)")
    g.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening (default 0.01)")
    g.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block (default 128)")
    g.add_argument("--true-sequential", action="store_true", help="re-run the block between q,k,v / o / gate,up / down")
    g.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the method (repeatable; e.g. percdamp=0.05 for sparsegpt); the value is read "
                        "as a YAML scalar; unknown keys list the known ones")
    a = p.add_argument_group("allocation")
    a.add_argument("--allocation", default="uniform", help="uniform (default) | owl | atp | rmi")
    a.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M (default 5)")
    a.add_argument("--owl-lambda", type=float, default=0.08, help="OWL lambda (default 0.08)")
    a.add_argument("--atp-beta", default="auto", help="ATP beta, or 'auto' (held-out search; default)")
    a.add_argument("--atp-candidates", type=int, default=4, help="ATP auto: number of beta candidates (default 4)")
    a.add_argument("--atp-step", type=float, default=None, help="ATP auto: fixed beta step instead (paper: 0.002)")
    a.add_argument("--atp-heldout", default="wikitext2-valid", help="ATP auto scoring data: wikitext2-valid | c4")
    a.add_argument("--allocation-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the allocation (repeatable; e.g. lam=0.1 for owl, beta=0.02 for atp)")
    s = p.add_argument_group("layers and calibration")
    s.add_argument("--include", action="append", default=None, help="glob over full layer names (repeatable; default all block linears)")
    s.add_argument("--exclude", action="append", default=[], help="glob of layers to keep dense (repeatable)")
    s.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: the protocol's)")
    s.add_argument("--seqlen", type=int, default=None, help="calibration window length (default: the protocol's)")
    s.add_argument("--seed", type=int, default=None, help="calibration seed (default: the protocol's)")
    s.add_argument("--device", default=None, help="compute device for the block being pruned (default: the model's)")
    s.add_argument("--offload", action="store_true", help="keep blocks off the device except the current one")
    s.add_argument("--stream", default="auto", choices=("auto", "on", "off"),
                   help="read and write the model block by block from its safetensors shards, so memory holds one "
                        "block: auto (default: when the whole model would not fit comfortably), on, off")
    r = p.add_argument_group("refinement")
    r.add_argument("--refine", default=None, help="mask refiner run inside the same pass: dsnot")
    r.add_argument("--refine-option", action="append", default=[], metavar="KEY=VALUE", help="refiner option (repeatable)")
    add_data_args(p)
    add_out_args(p)


def run(args) -> int:
    from ..options import parse_options
    from ..prune import PruneConfig, prune_checkpoint

    check_device(args.device)
    check_output(args.out, args.overwrite, inputs=[args.model])
    cfg = PruneConfig(
        method=args.method, sparsity=args.sparsity, structure=args.structure, allocation=args.allocation,
        owl_m=args.owl_m, owl_lambda=args.owl_lambda, atp_beta=args.atp_beta, atp_candidates=args.atp_candidates,
        atp_step=args.atp_step, atp_heldout=args.atp_heldout, include=args.include or ["*"], exclude=args.exclude,
        per_row=args.per_row, true_sequential=args.true_sequential, protocol=args.protocol, nsamples=args.nsamples,
        seqlen=args.seqlen, seed=args.seed, percdamp=args.percdamp, blocksize=args.blocksize, device=args.device,
        offload=args.offload, refine=args.refine, refine_options=dict(_option(o) for o in args.refine_option),
        method_options=parse_options(args.method_option, "--method-option"),
        allocation_options=parse_options(args.allocation_option, "--allocation-option"))
    r = prune_checkpoint(args.model, cfg, args.out, overwrite=args.overwrite, data_dir=args.data_dir, dtype=args.dtype,
                         stream=args.stream)
    t = r.timing
    extra = f"; beta {r.allocation_info['beta']:.6g}" if "beta" in r.allocation_info else ""
    print(f"pruned {args.model} with {r.method} ({r.structure}, allocation {r.allocation}{extra}"
          f"{', refiner ' + r.refiner if r.refiner else ''}): target {r.sparsity_target:.4f}, measured "
          f"{r.sparsity_measured:.4f} over {len(r.targets)} linears")
    print(f"time {t['total_s']:.1f} s (calibration forwards {t['calibration_forward_s']:.1f} s, statistics/masks "
          f"{t['stats_mask_s']:.1f} s, allocation {t['allocation_s']:.1f} s); peak RSS {r.peak_rss_mb or 0:.0f} MiB")
    if r.refiner_check:  # DSnoT accept=heldout / compare: which model was kept, and why
        from ..repair.dsnot_heldout import describe_check

        print(describe_check(r.refiner_check, r.method))
    print(f"checkpoint: {r.checkpoint} (per-layer plot: {r.plot})")
    return 0


COMMAND = Command("prune", "one-shot pruning (magnitude | wanda | sparsegpt; unstructured | N:M; uniform | owl | atp)",
                  add_arguments, run)
