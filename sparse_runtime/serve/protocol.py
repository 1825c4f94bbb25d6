"""OpenAI request parsing and error bodies.

Every bad request becomes an :class:`APIError` before it reaches the scheduler, so it can never
disturb running sequences; the body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
Options the server does not implement are refused by name (400), not ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional


class APIError(Exception):
    """An HTTP error with an OpenAI-style body. ``headers`` e.g. Retry-After on 429/503."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class SamplingParams:
    """temperature 0 = greedy (argmax, as ``generate``); ``seed`` makes sampling reproducible."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # an extension (vLLM's): fixed output lengths for load tests


@dataclass
class ParsedRequest:
    kind: str  # "completion" | "chat"
    model: str
    prompt: Any  # str | list[int] (completion) or the messages (chat)
    stream: bool
    include_usage: bool
    params: SamplingParams
    max_tokens_given: bool


# accepted only at their neutral value; anything else is refused (400) rather than ignored
_NEUTRAL = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0),
            "top_logprobs": (None, 0), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
            "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
            "functions": (None, []), "response_format": (None, {"type": "text"}), "repetition_penalty": (None, 1, 1.0)}
_KNOWN = {"model", "prompt", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
          "temperature", "top_p", "top_k", "stop", "seed", "user", "ignore_eos", "tool_choice", "parallel_tool_calls",
          "store", "metadata", "service_tier", *_NEUTRAL}


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{name} must be {kind} in [{lo}, {hi}] (got {v!r})", param=name)
    return int(v) if integer else float(v)


def parse_request(body: dict[str, Any], kind: str, model_name: str) -> ParsedRequest:
    """Validate ``body`` for ``/v1/completions`` (kind ``completion``) or ``/v1/chat/completions``."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model is required (GET /v1/models lists it)", param="model")
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise APIError(400, f"{name}={body[name]!r} is not supported by this server (docs/serving.md lists the "
                                f"options it implements)", param=name, code="unsupported_option")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise APIError(400, f"unknown option(s) {', '.join(unknown)}", param=unknown[0], code="unsupported_option")
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            pass
        elif not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)",
                           param="prompt")
    else:
        prompt = body.get("messages")
        if not isinstance(prompt, list) or not prompt or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt):
            raise APIError(400, "messages must be a non-empty list of {role, content} objects with string content",
                           param="messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", param="stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    mt_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, mt_name, None, 1, 2 ** 31 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    params = SamplingParams(max_tokens=max_tokens or 0,
                            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
                            top_k=_number(body, "top_k", 0, -1, 2 ** 31 - 1, integer=True),
                            seed=_number(body, "seed", None, -2 ** 63, 2 ** 64 - 1, integer=True), stop=stop,
                            ignore_eos=body.get("ignore_eos") is True)
    if params.top_k < 0:
        params.top_k = 0  # -1 = off (vLLM's convention)
    return ParsedRequest(kind, model, prompt, stream, bool(so.get("include_usage", True)), params,
                         max_tokens is not None)
