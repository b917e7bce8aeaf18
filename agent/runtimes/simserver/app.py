"""The simulator's HTTP side: vLLM's OpenAI-compatible endpoints, /health and /metrics.

Error bodies are OpenAI's: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llm_ops_helper.agent.runtimes.simserver.card import ModelCard
from llm_ops_helper.agent.runtimes.simserver.engine import Engine, Metrics, Request

# What the model "says": the same words every time, one token each.
_WORDS: Final = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and",
                 "then", "rests")


@dataclass(slots=True)
class SimState:
    card: ModelCard
    served_model_name: str
    engine: Engine
    metrics: Metrics
    loading: bool = True
    hung: bool = False
    # Set at shutdown: hung requests let go, so a stop does not wait out the grace period.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    created: int = field(default_factory=lambda: int(time.time()))
    rng: random.Random = field(default_factory=random.Random)


STATE: Final = web.AppKey("state", SimState)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": self.message, "type": self.kind,
                                            "param": None, "code": self.status}},
                                 status=self.status)


def _text(i: int) -> str:
    return (" " if i else "") + _WORDS[i % len(_WORDS)]


def _chars(content: Any) -> int:
    """Characters of a message's content: a string, or a list of parts with text."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    return 0


@dataclass(frozen=True, slots=True)
class _Call:
    chat: bool
    prompt_chars: int
    max_tokens: int
    stream: bool
    include_usage: bool


def _parse(body: Any, chat: bool, state: SimState) -> _Call:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "BadRequestError")
    model = body.get("model")
    if model is not None and model != state.served_model_name:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of objects",
                           "BadRequestError")
        chars = sum(_chars(m.get("content")) for m in messages)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            prompt = "".join(prompt)
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string", "BadRequestError")
        chars = len(prompt)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = state.card.sim.max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, f"max_tokens must be a positive integer, got {max_tokens!r}",
                       "BadRequestError")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    return _Call(chat, chars, max_tokens, bool(body.get("stream")), include_usage)


class _Completion:
    """One completion's OpenAI objects, chat or text."""

    def __init__(self, call: _Call, state: SimState, request: Request) -> None:
        self.call, self.request = call, request
        self.id = ("chatcmpl-" if call.chat else "cmpl-") + secrets.token_hex(12)
        self.head = {"id": self.id, "created": int(time.time()),
                     "model": state.served_model_name}

    def usage(self) -> dict[str, int]:
        prompt, made = self.request.prompt_tokens, self.request.max_tokens
        return {"prompt_tokens": prompt, "completion_tokens": made,
                "total_tokens": prompt + made}

    def whole(self) -> dict[str, Any]:
        text = "".join(_text(i) for i in range(self.request.max_tokens))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
        if self.call.chat:
            choice["message"] = {"role": "assistant", "content": text}
            kind = "chat.completion"
        else:
            choice["text"] = text
            kind = "text_completion"
        return {**self.head, "object": kind, "choices": [choice], "usage": self.usage()}

    def chunk(self, i: int | None) -> dict[str, Any]:
        """Token ``i``'s chunk; None for the last one, which carries the finish reason."""
        text = "" if i is None else _text(i)
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": "length" if i is None else None}
        if self.call.chat:
            delta: dict[str, Any] = {} if i is None else {"content": text}
            if i == 0:
                delta = {"role": "assistant", **delta}
            choice["delta"] = delta
            kind = "chat.completion.chunk"
        else:
            choice["text"] = text
            kind = "text_completion"
        return {**self.head, "object": kind, "choices": [choice]}

    def usage_chunk(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.call.chat else "text_completion"
        return {**self.head, "object": kind, "choices": [], "usage": self.usage()}


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _complete(http: web.Request, chat: bool) -> web.StreamResponse:
    state = http.app[STATE]
    if state.loading:
        raise ApiError(503, "Loading model", "ServiceUnavailableError")
    try:
        body = await http.json()
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON", "BadRequestError") from None
    call = _parse(body, chat, state)
    if state.rng.random() < state.card.faults.error_rate:
        raise ApiError(500, "simulated engine failure (faults.error_rate)",
                       "InternalServerError")
    engine = state.engine
    request = engine.new_request(call.prompt_chars, call.max_tokens)
    await engine.admit(request)
    completion = _Completion(call, state, request)
    itl = request.itl_s
    try:
        await asyncio.sleep(engine.ttft_s(request))
        engine.first_token(request)
        engine.token(None)
        if not call.stream:
            await asyncio.sleep(itl * (request.max_tokens - 1))
            for _ in range(request.max_tokens - 1):
                engine.token(itl)
            engine.finish(request, "length")
            return web.json_response(completion.whole())
        return await _stream(http, completion, engine)
    finally:
        engine.finish(request, "abort")  # a no-op unless it is still running (cancelled)


async def _stream(http: web.Request, completion: _Completion,
                  engine: Engine) -> web.StreamResponse:
    request, itl = completion.request, completion.request.itl_s
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(http)
    try:
        await response.write(_sse(completion.chunk(0)))
        last = time.monotonic()
        for i in range(1, request.max_tokens):
            await asyncio.sleep(itl)
            now = time.monotonic()
            engine.token(now - last)
            last = now
            await response.write(_sse(completion.chunk(i)))
        engine.finish(request, "length")
        await response.write(_sse(completion.chunk(None)))
        if completion.call.include_usage:
            await response.write(_sse(completion.usage_chunk()))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away mid-stream: the caller counts an abort
    return response


async def chat_completions(http: web.Request) -> web.StreamResponse:
    return await _complete(http, chat=True)


async def completions(http: web.Request) -> web.StreamResponse:
    return await _complete(http, chat=False)


async def health(http: web.Request) -> web.Response:
    if http.app[STATE].loading:
        raise ApiError(503, "Loading model", "unavailable_error")
    return web.Response(status=200)


async def models(http: web.Request) -> web.Response:
    state = http.app[STATE]
    card = state.card.sim
    return web.json_response({"object": "list", "data": [{
        "id": state.served_model_name, "object": "model", "created": state.created,
        "owned_by": "llmops-sim", "root": state.served_model_name, "parent": None,
        "max_model_len": card.kv_cache_tokens}]})


async def metrics(http: web.Request) -> web.Response:
    body = generate_latest(http.app[STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def _faults_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    if state.hung:
        await state.stopping.wait()  # never answers; the connection stays open
        raise web.HTTPServiceUnavailable()
    # Counted as vLLM's instrumentator does: what the answer's status was, 500 when the handler
    # raised before answering; the route template, or "none" where no route matched.
    status = 500
    try:
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except ApiError as exc:
        status = exc.status
        return exc.response()
    except web.HTTPException as exc:  # aiohttp's own 404/405 for unknown routes and methods
        status = exc.status
        raise
    finally:
        state.metrics.http_request(request.method, status, *_route_of(request))


def _route_of(request: web.Request) -> tuple[str, bool]:
    """The route template that took ``request`` (and True), or its path (and False)."""
    resource = request.match_info.route.resource
    if resource is None:  # a 405 has a route, for other methods: Starlette's partial match
        resource = next((r for r in request.app.router.resources()
                         if r.canonical == request.path), None)
    return (resource.canonical, True) if resource is not None else (request.path, False)


def build_app(state: SimState) -> web.Application:
    app = web.Application(middlewares=[_faults_and_errors])
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/metrics", metrics)
    return app


__all__ = ["STATE", "SimState", "build_app"]
