"""``sparse-runtime bench DENSE SPARSE... --engines ...``: dense vs sparse latency per engine."""
from __future__ import annotations

from . import Command


def add_arguments(p):
    from ..bench.latency import DEFAULT_ENGINES, DEFAULT_SCENARIOS, LOAD_ORDERS

    p.add_argument("dense", help="the dense model (checkpoint directory or spec, e.g. smollm2-135m)")
    p.add_argument("sparse", nargs="+", help="sparse checkpoints, each DIR or LABEL=DIR")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated engines (default {','.join(DEFAULT_ENGINES)}); unavailable ones are skipped "
                        "with the install command")
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help="comma-separated prefill:BxT and decode:B@C (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (>= 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=16, help="tokens per timed decode run")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default min(2, cores))")
    p.add_argument("--load-order", default="dense-first", choices=sorted(LOAD_ORDERS),
                   help="order in which in-process engines load the models (not neutral for ONNX Runtime: "
                        "run both orders to see the effect)")
    p.add_argument("--name", default="latency", help="result file stem")
    p.add_argument("--out-dir", default="benchmarks/results")


def parse_models(items) -> list[tuple[str, str]]:
    from pathlib import Path

    out = []
    for it in items:
        label, _, path = it.partition("=") if "=" in it else (Path(it).name, "", it)
        out.append((label, path))
    return out


def run(args) -> int:
    from ..bench.latency import LatencyConfig, run_latency, save_latency

    cfg = LatencyConfig(engines=[e.strip() for e in args.engines.split(",") if e.strip()],
                        scenarios=[s.strip() for s in args.scenarios.split(",") if s.strip()],
                        repeats=args.repeats, warmup=args.warmup, decode_steps=args.decode_steps, threads=args.threads,
                        load_order=args.load_order)
    res = run_latency(args.dense, parse_models(args.sparse), cfg)
    save_latency(res, name=args.name, model=args.dense, out_dir=args.out_dir)
    return 0


COMMAND = Command("bench", "latency of a dense model and its sparse versions on each engine (prefill, decode, batch)",
                  add_arguments, run)
