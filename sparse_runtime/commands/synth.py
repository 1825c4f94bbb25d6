"""``sparse-runtime synth --shape llama-2-7b --out DIR``: a random-weight model of a real shape.

For scale tests and latency/memory benchmarks only (sparse_runtime/models/synthetic.py): the values
are random, so no quality figure may come from such a model.
"""
from __future__ import annotations

from . import Command


def add_arguments(p):
    from ..models.synthetic import SHAPES

    p.add_argument("--shape", default=None, help=f"one of: {', '.join(SHAPES)}")
    p.add_argument("--out", default=None, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--dtype", default="bfloat16", help="stored dtype: bfloat16 (default), float32 or float16")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder blocks (a depth slice)")
    p.add_argument("--seed", type=int, default=0, help="random seed (each tensor has its own stream)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB, as Hugging Face)")
    p.add_argument("--tokenizer", default="default",
                   help="model directory whose tokenizer is copied (default: the embedded SmolLM2 one, cut to the "
                        "shape's vocabulary; none for tiny shapes), or 'none'")
    p.add_argument("--list", action="store_true", help="list the shapes and their sizes, then exit")


def run(args) -> int:
    from ..errors import ConfigError
    from ..models.synthetic import SHAPES, _dtype, synthetic_config, tensor_plan, write_synthetic
    from ._common import check_output

    if args.list:
        for name in SHAPES:
            specs = tensor_plan(synthetic_config(name, args.layers))
            n = sum(s.numel for s in specs)
            print(f"{name:14s} {n / 1e9:7.3f} B parameters")
        return 0
    if not args.shape or not args.out:
        raise ConfigError("synth needs --shape NAME and --out DIR (see --list for the shapes)")
    if args.shape not in SHAPES:
        raise ConfigError(f"unknown synthetic shape {args.shape!r}; choose one of {', '.join(SHAPES)}")
    _dtype(args.dtype)
    check_output(args.out, args.overwrite)
    out = write_synthetic(args.shape, args.out, dtype=args.dtype, layers=args.layers, seed=args.seed,
                          max_shard_bytes=args.max_shard_size, tokenizer=args.tokenizer, overwrite=args.overwrite)
    print(f"wrote {out}: {args.shape}{f' ({args.layers} blocks)' if args.layers else ''}, {args.dtype}, random "
          "weights (latency and memory only; no quality figure may come from it)")
    return 0


COMMAND = Command("synth", "write a random-weight Hugging Face model of a real shape (for scale tests)",
                  add_arguments, run)
