"""The ASGI app (Starlette): OpenAI's ``/v1/completions``, ``/v1/chat/completions`` (JSON or
server-sent events), ``/v1/models``, plus ``/health`` and ``/metrics``.

Handlers validate everything before a request reaches the scheduler (bad requests get their 4xx
and touch nothing else), then wait on an ``asyncio.Queue`` the engine thread feeds. A client that
disconnects (a closed stream, or a dropped connection while waiting for a JSON answer) cancels its
sequence, and the scheduler frees its slot before the next step. Each choice also carries
``token_ids`` (an extension: the generated ids, so clients can compare with ``generate`` exactly).
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Optional

from .config import ServeConfig
from .metrics import Metrics
from .protocol import APIError, ParsedRequest, parse_json, parse_request
from .scheduler import Scheduler, Sequence
from .slots import make_slots
from .text import TextStream, chat_prompt_ids, encode_text



class ServeState:
    """What the handlers share: the engine, its tokenizer, the scheduler and the metrics."""

    def __init__(self, engine, config: ServeConfig, model_name: str):
        from ..models import ByteTokenizer

        self.engine, self.config, self.model_name = engine, config, model_name
        self.tokenizer = getattr(engine, "tokenizer", None) or ByteTokenizer()
        self.metrics = Metrics()
        self.slots = make_slots(engine, config.slots, config.max_model_len)
        self.capacity = self.slots.capacity
        self.vocab = int(engine.vocab_size)
        self.created = int(time.time())
        self.scheduler = Scheduler(self.slots, eos_token_id=getattr(self.tokenizer, "eos_token_id", None),
                                   prefill_chunk=config.prefill_chunk, max_queue=config.max_queue,
                                   threads=engine.threads, metrics=self.metrics, retry_after=config.retry_after)
        from ..runtime.base import rss_mb

        self.metrics.gauge("resident_memory_bytes", lambda: rss_mb() * 2 ** 20, "resident set size of the server")

    def prompt_ids(self, req: ParsedRequest) -> list[int]:
        if req.kind == "chat":
            return chat_prompt_ids(self.tokenizer, req.prompt)
        if isinstance(req.prompt, list):
            bad = [t for t in req.prompt if not 0 <= t < self.vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab})", param="prompt")
            return list(req.prompt)
        return encode_text(self.tokenizer, req.prompt)

    def check_lengths(self, req: ParsedRequest, ids: list[int]) -> None:
        cap, n = self.capacity, len(ids)
        if n + 1 > cap:
            raise APIError(400, f"the prompt has {n} tokens; this server's context is {cap} tokens (prompt + output): "
                                f"shorten the prompt", param="messages" if req.kind == "chat" else "prompt",
                           code="context_length_exceeded")
        p = req.params
        if req.max_tokens_given:
            if n + p.max_tokens > cap:
                raise APIError(400, f"max_tokens {p.max_tokens} + {n} prompt tokens exceed the context of {cap} "
                                    f"tokens; ask for at most {cap - n}", param="max_tokens",
                               code="context_length_exceeded")
        else:
            p.max_tokens = cap - n if req.kind == "chat" else min(self.config.default_max_tokens, cap - n)


def _error(e: APIError, metrics: Optional[Metrics] = None):
    from starlette.responses import JSONResponse

    if metrics is not None:
        metrics.inc("request_errors_total", label=str(e.status))
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _choice(kind: str, text: Optional[str], finish: Optional[str], ids: list[int], first: bool = False,
            stream: bool = False) -> dict[str, Any]:
    c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None, "token_ids": ids}
    if kind == "completion":
        c["text"] = text or ""
    elif stream:
        c["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
    else:
        c["message"] = {"role": "assistant", "content": text}
    return c


def create_app(engine, config: ServeConfig, model_name: Optional[str] = None):
    """The Starlette app serving ``engine`` (already loaded). ``app.state.serve`` is the
    :class:`ServeState` (its scheduler is stopped by the app's lifespan shutdown)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    name = model_name or config.served_model_name or "model"
    st = ServeState(engine, config, name)

    async def generate(request: Request, kind: str):
        try:
            req = parse_request(parse_json(await request.body()), kind, st.model_name)
            ids = st.prompt_ids(req)
            st.check_lengths(req, ids)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()

            def emit(ev: str, payload: Any) -> None:  # called from the engine thread
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (ev, payload))
                except RuntimeError:  # the event loop is gone (server stopped): nobody to tell
                    pass

            seq = Sequence(ids, req.params, TextStream(st.tokenizer, req.params.stop), emit,
                           timeout=config.request_timeout)
            st.scheduler.submit(seq)
        except APIError as e:
            return _error(e, st.metrics)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        obj = "chat.completion" if kind == "chat" else "text_completion"
        head = {"id": prefix + seq.id, "object": obj + (".chunk" if req.stream and kind == "chat" else ""),
                "created": int(time.time()), "model": st.model_name}
        if req.stream:
            return StreamingResponse(_sse(st, seq, queue, head, kind), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async def watch() -> None:  # the body is read: the next message is the client leaving
            while (await request.receive())["type"] != "http.disconnect":
                pass
            st.scheduler.cancel(seq)

        watcher = asyncio.create_task(watch())
        try:
            while True:
                ev, payload = await queue.get()
                if ev == "done":
                    reason, usage, text, out, err = payload
                    if reason == "error":
                        return _error(APIError(500, f"the engine failed: {err}", "server_error"), st.metrics)
                    return JSONResponse({**head, "choices": [_choice(kind, text, reason, out)], "usage": usage})
        finally:
            watcher.cancel()

    async def completions(request: Request):
        return await generate(request, "completion")

    async def chat(request: Request):
        return await generate(request, "chat")

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created,
                                                         "owned_by": "sparse-runtime", "max_model_len": st.capacity}]})

    async def health(request: Request):
        if st.scheduler.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok", "engine": engine.name, "model": st.model_name})

    async def metrics(request: Request):
        return PlainTextResponse(st.metrics.render(), media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code),
                      st.metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(st.scheduler.stop)

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/models", models, methods=["GET"]),
                            Route("/health", health, methods=["GET"]),
                            Route("/metrics", metrics, methods=["GET"])],
                    exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.serve = st
    return app


async def _sse(st: ServeState, seq: Sequence, queue: asyncio.Queue, head: dict, kind: str) -> AsyncIterator[str]:
    """Server-sent events: one chunk per token (text may be empty while a character or a possible
    stop string is pending), a last chunk with finish_reason and usage, then ``[DONE]``."""
    first = True
    try:
        while True:
            ev, payload = await queue.get()
            if ev == "token":
                text, ids = payload
                yield f"data: {json.dumps({**head, 'choices': [_choice(kind, text, None, ids, first, True)]})}\n\n"
                first = False
            else:
                reason, usage, _, _, err = payload
                if reason == "error":
                    yield f"data: {json.dumps({'error': {'message': f'the engine failed: {err}', 'type': 'server_error'}})}\n\n"
                chunk = {**head, "choices": [_choice(kind, None, reason, [], first, True)], "usage": usage}
                yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
                return
    finally:
        st.scheduler.cancel(seq)  # a no-op when it finished; frees the slot when the client left
