"""``sparse-runtime bench DENSE SPARSE... --engines ...``: dense vs sparse latency per engine."""
from __future__ import annotations

from . import Command


def add_arguments(p):
    from ..measure.latency import DEFAULT_ENGINES, DEFAULT_SCENARIOS, LOAD_ORDERS

    p.add_argument("dense", help="the dense model (checkpoint directory or spec, e.g. smollm2-135m)")
    p.add_argument("sparse", nargs="+", help="sparse checkpoints, each DIR or LABEL=DIR")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated engines (default {','.join(DEFAULT_ENGINES)}); unavailable ones are skipped "
                        "with the install command")
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help="comma-separated prefill:BxT and decode:B@C (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (>= 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per model before timing (>= 1; default 1)")
    p.add_argument("--decode-steps", type=int, default=16, help="tokens per timed decode run")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default min(2, cores))")
    from ._dtype import add_act_dtype_argument, add_dtype_argument, add_kv_dtype_argument, add_prefill_dtype_argument

    add_dtype_argument(p)
    add_prefill_dtype_argument(p)
    add_act_dtype_argument(p)
    add_kv_dtype_argument(p)
    p.add_argument("--load-order", default="dense-first", choices=sorted(LOAD_ORDERS),
                   help="order in which in-process engines load the models (not neutral for ONNX Runtime: "
                        "run both orders to see the effect)")
    p.add_argument("--name", default="latency", help="result file stem")
    p.add_argument("--out", "--out-dir", dest="out", default=None, metavar="DIR",
                   help="write <name>.md/.json/.png into DIR (default: print the table only; nothing is written)")
    p.add_argument("--overwrite", action="store_true", help="replace existing <name>.* result files in --out")


def parse_models(items) -> list[tuple[str, str]]:
    from pathlib import Path

    out = []
    for it in items:
        label, _, path = it.partition("=") if "=" in it else (Path(it).name, "", it)
        out.append((label, path))
    return out


def check_request(args, cfg) -> None:
    """Impossible scenarios and result files that would be replaced: one clear line, before any work."""
    from pathlib import Path

    from ..measure.latency import parse_scenario
    from ..errors import CheckpointExistsError, ConfigError
    from ..models.loading import model_context_limit

    cfg.validate()
    if args.decode_steps < 1:
        raise ConfigError(f"--decode-steps {args.decode_steps}: a decode scenario times at least 1 step")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: give at least 1 thread")
    if not cfg.scenarios:
        raise ConfigError("--scenarios is empty; give e.g. prefill:1x128,decode:1@128")
    if not cfg.engines:
        raise ConfigError("--engines is empty; give e.g. torch-cpu,ort-cpu")
    for label, path in [("dense", args.dense), *parse_models(args.sparse)]:
        limit = model_context_limit(path)
        if not limit:
            continue
        for text in cfg.scenarios:
            sc = parse_scenario(text, cfg.decode_steps)
            need = sc.tokens + (sc.steps if sc.kind == "decode" else 0)
            if need > limit:
                raise ConfigError(f"scenario {text} needs {need} positions but {label} model {path} has a context "
                                  f"of {limit}; choose a shorter scenario")
    if args.out:
        out = Path(args.out).expanduser().absolute()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {args.out} is a file, not a directory: choose another --out")
        clash = [p for p in (out / f"{args.name}{s}" for s in (".md", ".json", ".png")) if p.exists()]
        if clash and not args.overwrite:
            raise CheckpointExistsError(f"{clash[0]} already exists; choose another --out or --name, or pass "
                                        "--overwrite to replace it")
        # a read-only or unwritable --out should cost a second, not the whole benchmark
        from ._common import _probe_writable

        where = out
        while not where.exists():
            where = where.parent
        if not where.is_dir():
            raise ConfigError(f"--out {args.out} cannot be created: {where} is a file; choose another --out")
        _probe_writable(where, args.out, "--out")


def run(args) -> int:
    import tempfile

    from ..measure.latency import LatencyConfig, run_latency, save_latency

    cfg = LatencyConfig(engines=[e.strip() for e in args.engines.split(",") if e.strip()],
                        scenarios=[s.strip() for s in args.scenarios.split(",") if s.strip()],
                        repeats=args.repeats, warmup=args.warmup, decode_steps=args.decode_steps, threads=args.threads,
                        load_order=args.load_order)
    from ._dtype import engine_dtype_options

    for e in cfg.engines:  # every engine must run the dtype: one line before any model is loaded
        opts = engine_dtype_options(e, getattr(args, "dtype", None), getattr(args, "prefill_dtype", None),
                                    act_dtype=getattr(args, "act_dtype", None),
                                    kv_dtype=getattr(args, "kv_dtype", None))
        if opts:
            cfg.engine_options.setdefault(e, {}).update(opts)
    check_request(args, cfg)
    res = run_latency(args.dense, parse_models(args.sparse), cfg)
    if args.out:
        save_latency(res, name=args.name, model=args.dense, out_dir=args.out)
        print(f"results: {args.out}/{args.name}.md (.json, .png)")
    else:  # print the table only: results belong where the user asks (benchmarks/results/ is the repo's)
        with tempfile.TemporaryDirectory(prefix="sr-bench-") as tmp:
            save_latency(res, name=args.name, model=args.dense, out_dir=tmp)
        print("(nothing written: pass --out DIR to keep the table, JSON and plot)")
    return 0


COMMAND = Command("bench", "latency of a dense model and its sparse versions on each engine (prefill, decode, batch)",
                  add_arguments, run)
