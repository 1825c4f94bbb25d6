"""Running the app under uvicorn: :func:`run_server` (the command; SIGTERM drains gracefully) and
:class:`ServerThread` (tests and the benchmark: a server on a loopback port in a thread)."""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable, Optional, TypeVar

from .config import ServeConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


def _uvicorn_config(app, config: ServeConfig, **kw):
    import uvicorn

    # uvicorn's own grace ends after ours, so the scheduler ends leftovers with finish_reason "abort"
    # and clients get a last chunk before connections close
    return uvicorn.Config(app, host=config.host, port=config.port, timeout_graceful_shutdown=config.shutdown_grace + 5,
                          log_level=kw.pop("log_level", "info"), access_log=kw.pop("access_log", False), **kw)


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: stop admitting (503 + Retry-After), give in-flight requests the grace
        period, then let uvicorn close the listener and finish."""

        def handle_exit(self, sig, frame):
            st = getattr(self.config.app.state, "serve", None) if hasattr(self.config.app, "state") else None
            if st is not None and not st.scheduler.draining:
                log.info("draining: %d running, %d queued; grace %.0f s", len(st.scheduler.running),
                         len(st.scheduler.waiting), st.config.shutdown_grace)
                st.scheduler.drain(st.config.shutdown_grace)
            super().handle_exit(sig, frame)

    return DrainingServer


def in_worker_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a short-lived thread and return its result (its exception is raised here).

    Why: libgomp keeps one thread pool per thread that opened a parallel region, and once the
    process holds more OpenMP threads than cores, every barrier stops spinning and sleeps. The
    engine's steps run in the scheduler thread; when loading and calibration had run parallel
    regions on the main thread, that idle pool counted against them and the C decode step took
    ~23 ms instead of ~14 ms (SmolLM2 Wanda 70 %, 2 cores: ``benchmarks/results/serve*.md``). A
    pool ends with its thread, so ``serve`` loads the engine and builds the app (which starts the
    scheduler thread) in a thread that then exits."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name="sparse-runtime-load")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_server(engine, config: ServeConfig, model_name: Optional[str] = None, app=None) -> None:
    """Serve until SIGTERM/SIGINT. ``app``: one already built by :func:`create_app` for ``engine``
    (the command builds it off the main thread, see :func:`in_worker_thread`)."""
    from .app import create_app

    app = app if app is not None else create_app(engine, config, model_name)
    st = app.state.serve
    log.info("serving %s on http://%s:%d (engine %s, %d slots x %d tokens, %s, KV cache %.1f MB)", st.model_name,
             config.host, config.port, engine.name, st.slots.n, st.capacity,
             "continuous batching" if st.slots.batched else "sequences in turn (no slot interface)",
             st.slots.cache_bytes() / 2 ** 20)
    _server_class()(_uvicorn_config(app, config)).run()


class ServerThread:
    """A server on ``127.0.0.1`` and an ephemeral port, in a daemon thread (``url``, ``stop()``)."""

    def __init__(self, engine, config: ServeConfig, model_name: Optional[str] = None):
        from .app import create_app

        self.app = create_app(engine, config, model_name)
        self.state = self.app.state.serve
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = _server_class()(_uvicorn_config(self.app, config, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if not self.thread.is_alive() or time.time() - t0 > 30:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
