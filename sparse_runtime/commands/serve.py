"""``sparse-runtime serve MODEL --engine ENGINE``: an OpenAI-compatible server (docs/serving.md)."""
from __future__ import annotations

from . import Command


def add_arguments(p):
    from ..serve.config import ServeConfig

    d = ServeConfig()
    p.add_argument("model", help="checkpoint directory, export directory, or a model spec (smollm2-135m, tiny-llama)")
    p.add_argument("--engine", default="sparse-cpu",
                   help="sparse-cpu (default; continuous batching on the project's sparse kernels), lean-cpu (its dense "
                        "twin), ort-sparse, ort-cpu or torch-cpu (these serve sequences in turn, batch 1)")
    p.add_argument("--host", default=d.host, help="address to listen on (default %(default)s; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=d.port, help=f"TCP port to listen on (default {d.port})")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: min(2, cores))")
    p.add_argument("--slots", type=int, default=d.slots, help="sequences decoded together (default %(default)s)")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len,
                   help="tokens per sequence, prompt + output; each slot's KV cache holds this many (default %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk,
                   help="prompt tokens per scheduler step (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests waiting for a slot before 429 (default %(default)s)")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds (default %(default)s)")
    p.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace,
                   help="seconds in-flight requests get after SIGTERM (default %(default)s)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model's name)")
    from ._dtype import (add_act_dtype_argument, add_batch_dtype_argument, add_dtype_argument, add_kv_dtype_argument,
                         add_prefill_dtype_argument)

    add_dtype_argument(p)
    add_prefill_dtype_argument(p)
    add_batch_dtype_argument(p)
    add_act_dtype_argument(p)
    add_kv_dtype_argument(p)


def run(args) -> int:
    from pathlib import Path

    from ..errors import ConfigError
    from ..runtime import load_engine
    from ..serve.config import ServeConfig

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("serve needs starlette and uvicorn: pip install 'sparse-runtime[serve]'") from None
    from ._dtype import engine_dtype_options

    dtype_opts = engine_dtype_options(args.engine, getattr(args, "dtype", None),  # refused before loading
                                      getattr(args, "prefill_dtype", None), getattr(args, "batch_dtype", None),
                                      getattr(args, "act_dtype", None), getattr(args, "kv_dtype", None))
    for name in ("slots", "max_model_len", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    cfg = ServeConfig(host=args.host, port=args.port, slots=args.slots, max_model_len=args.max_model_len,
                      prefill_chunk=args.prefill_chunk, max_queue=args.max_queue, request_timeout=args.request_timeout,
                      shutdown_grace=args.shutdown_grace, served_model_name=args.served_model_name)
    try:  # the model's own context bounds each slot (past it the positions are garbage)
        from ..models.loading import model_context_limit

        limit = model_context_limit(args.model)
    except ImportError:  # pragma: no cover - older tree
        limit = None
    if limit and cfg.max_model_len > limit:
        import logging

        logging.getLogger(__name__).info("--max-model-len %d > the model's context %d: using %d",
                                         cfg.max_model_len, limit, limit)
        cfg.max_model_len = limit
    from ..serve.app import create_app
    from ..serve.server import in_worker_thread, run_server

    name = args.served_model_name or Path(str(args.model).rstrip("/")).name

    def load():  # off the main thread: its OpenMP pools must not outlive the load (in_worker_thread)
        e = load_engine(args.engine, args.model, threads=args.threads, **dtype_opts)
        return e, create_app(e, cfg, name)

    eng, app = in_worker_thread(load)
    try:
        run_server(eng, cfg, name, app=app)
    finally:
        eng.close()
    return 0


COMMAND = Command("serve", "an OpenAI-compatible HTTP server (continuous batching on sparse-cpu/lean-cpu)",
                  add_arguments, run)
