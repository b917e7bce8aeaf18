"""The gateway's HTTP side: OpenAI's /v1 endpoints, proxied to ready replicas.

Every refusal is an OpenAI error body, ``{"error": {"message", "type", "param", "code"}}``:
401 a missing or unknown key, 415 not JSON, 413 too large, 400 malformed or over a cap or
blocked by a guard, 404 an unknown model, 429 over a rate (with Retry-After), 503 no replica
came in time, 502/504 the backend failed before answering. A stream the backend cuts off ends
with a ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llm_ops_helper.controller.gateway.config import GatewayConfig, KeyConfig
from llm_ops_helper.controller.gateway.guards import fingerprint, openai_error
from llm_ops_helper.controller.gateway.limits import (
    KeyLimits,
    estimate_prompt_tokens,
    requested_completion_tokens,
)
from llm_ops_helper.controller.gateway.metering import Meter
from llm_ops_helper.controller.gateway.relay import (
    Redactor,
    StreamRewriter,
    redact_whole,
    sse,
)
from llm_ops_helper.controller.gateway.routing import Replica, Route, Router
from llm_ops_helper.controller.gateway.upstream import (
    ConnectFailed,
    Response,
    Upstream,
    UpstreamBroken,
)

log = structlog.get_logger("llmops.gateway")
_decode = msgspec.json.Decoder()
_encode = msgspec.json.Encoder()
# Charged up front for a request that names no max_tokens; settled with the real usage after.
DEFAULT_COMPLETION_CHARGE = 256
# Which replica answered: for a client's bug report, and the tests' count of the spread.
REPLICA_HEADER = "X-LLMOps-Replica"


class Verdict(Protocol):
    @property
    def action(self) -> str: ...
    @property
    def check(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def messages(self) -> Any: ...


class Guards(Protocol):
    """What the gateway asks of a request's guards: its key's, its model's, or both
    (controller/gateway/guards.py)."""

    def check_input(self, messages: Any, /, *, prompt_tokens: int) -> Verdict: ...
    def redactor(self) -> Redactor: ...
    def redact(self, text: str) -> str: ...


def error(status: int, message: str, code: str, kind: str = "invalid_request_error",
          param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.Response(body=_encode.encode(body), status=status, headers=headers,
                        content_type="application/json")


# The guards of one key's requests to one deployment (None: a deployment without its own).
GuardsFor = Callable[[KeyConfig, str | None], Guards | None]


@dataclass(slots=True)
class Caller:
    key: KeyConfig
    limits: KeyLimits
    guards: Guards | None  # for a deployment without guards of its own
    model_guards: dict[str, Guards]  # deployment -> the key's and its guards together


class Gateway:
    """The state the handlers share: keys, router, meter, the backend connection pool."""

    def __init__(self, config: GatewayConfig, router: Router, meter: Meter,
                 upstream: Upstream,
                 guards_for: GuardsFor = lambda key, deployment: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.router, self.meter, self.upstream = config, router, meter, upstream
        self.clock = clock
        self.callers = {k.sha256: Caller(k, KeyLimits(k, clock()), guards_for(k, None),
                                         _model_guards(config, k, guards_for))
                        for k in config.keys}

    def caller(self, request: web.Request) -> Caller | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.callers.get(hashlib.sha256(token.strip().encode()).hexdigest())


def _model_guards(config: GatewayConfig, key: KeyConfig, guards_for: GuardsFor
                  ) -> dict[str, Guards]:
    """Deployment -> a key's guards there, for the deployments with guards of their own: built
    once, so a request pays one dict lookup for them."""
    found = {model.name: guards_for(key, model.name) for model in config.models}
    return {name: guards for name, guards in found.items() if guards is not None}


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
_UNAUTHORIZED = ("missing or unknown API key: send 'Authorization: Bearer <key>'",
                 "invalid_api_key")


@dataclass(slots=True)
class Call:
    """One admitted request on its way to a backend."""

    caller: Caller
    model: str
    route: Route
    guards: Guards | None  # the key's and the deployment's
    chat: bool
    body: dict[str, Any]
    payload: bytes
    stream: bool
    client_wants_usage: bool
    prompt_estimate: int
    charged: int


async def _admit(request: web.Request, gw: Gateway, chat: bool) -> Call | web.Response:
    caller = gw.caller(request)
    if caller is None:
        return error(401, *_UNAUTHORIZED)
    if request.content_type != "application/json":
        return error(415, f"expected Content-Type: application/json, got "
                          f"{request.content_type!r}", "unsupported_media_type")
    limit = gw.config.limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return error(413, f"the body is over the limit of {limit} bytes", "body_too_large")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"the body is over the limit of {limit} bytes", "body_too_large")
    try:
        body = _decode.decode(raw)
    except msgspec.DecodeError as exc:
        return error(400, f"the body is not valid JSON: {exc}", "invalid_json")
    except RecursionError:  # msgspec recurses per nesting level: many '[' end up here
        return error(400, "the body's JSON is nested too deeply", "invalid_json")
    if not isinstance(body, dict):
        return error(400, "the body must be a JSON object", "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return error(400, "'model' is required (a string)", "missing_model", param="model")
    route = gw.router.resolve(model)
    if route is None or not (caller.key.allows(route.deployment) or caller.key.allows(model)):
        return error(404, f"The model `{model}` does not exist or this key may not use it.",
                     "model_not_found", param="model")
    field = "messages" if chat else "prompt"
    value = body.get(field)
    if chat and not (isinstance(value, list) and value and all(isinstance(m, dict)
                                                               for m in value)):
        return error(400, "'messages' must be a non-empty list of objects", "invalid_value",
                     param="messages")
    if not chat and not (isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(p, str) for p in value))):
        return error(400, "'prompt' must be a string or a list of strings", "invalid_value",
                     param="prompt")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        return error(400, "'stream' must be a boolean", "invalid_value", param="stream")
    prompt = estimate_prompt_tokens(body)
    completion = requested_completion_tokens(body)
    if (refusal := caller.limits.check_sizes(prompt, completion)) is not None:
        return error(refusal.status, refusal.message, refusal.code)
    changed = False
    cap = caller.key.max_completion_tokens
    if completion is None and cap is not None:
        body["max_tokens"] = completion = cap
        changed = True
    charged = prompt + (completion or DEFAULT_COMPLETION_CHARGE)
    if (refusal := caller.limits.admit(charged, gw.clock())) is not None:
        gw.meter.record(caller.key.name, route.deployment, 429, 0, 0)
        return error(429, refusal.message, refusal.code, kind="rate_limit_error",
                     headers={"Retry-After": str(refusal.retry_after_s)})
    # By the resolved deployment, so that an alias or a version ref is guarded as well.
    guards = caller.model_guards.get(route.deployment, caller.guards)
    if guards is not None:
        verdict = guards.check_input(value, prompt_tokens=prompt)
        if verdict.action != "allow":
            gw.meter.metrics.guard_actions.labels(verdict.check, verdict.action).inc()
        if verdict.action == "block":
            caller.limits.settle(charged, prompt)
            gw.meter.record(caller.key.name, route.deployment, 400, 0, 0)
            # Enough to find the request again (its input's hash), never the input itself.
            log.warning("guard_blocked", key=caller.key.name, model=route.deployment,
                        check=verdict.check, reason=verdict.reason,
                        input=fingerprint(_encode.encode(value).decode()))
            return web.Response(body=_encode.encode(openai_error(verdict.check, verdict.reason)),
                                status=400, content_type="application/json")
        if verdict.action == "redact" and verdict.messages is not None:
            body[field] = verdict.messages
            changed = True
    options = body.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    if stream and not wants_usage:  # the gateway asks for usage itself, to meter it
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}
        changed = True
    if route.version is not None:  # replicas serve under the deployment's name
        body["model"] = route.deployment
        changed = True
    return Call(caller, model, route, guards, chat, body,
                _encode.encode(body) if changed else raw, stream, wants_usage, prompt, charged)


async def _connect(gw: Gateway, call: Call, path: str
                   ) -> tuple[Replica, Response] | web.Response:
    """Send the request to a replica; on a connection failure, to another (nothing was
    answered yet); hold while the deployment has none ready."""
    hold = gw.config.limits.hold_s
    replica = await gw.router.wait_for(call.route, hold)
    if replica is None:
        return error(503, f"no ready replica of {call.route.deployment!r} within {hold:g} s",
                     "no_replica", kind="service_unavailable", headers={"Retry-After": "5"})
    tried: set[str] = set()
    while True:
        replica.in_flight += 1
        try:
            resp = await gw.upstream.post(replica.url, path, call.payload)
            return replica, resp
        except ConnectFailed as exc:
            replica.in_flight -= 1
            gw.meter.metrics.upstream_errors.labels(call.route.deployment, "connect").inc()
            log.warning("upstream_connect_failed", replica=replica.name, error=str(exc))
            gw.router.suspect(replica)
            tried.add(replica.name)
            nxt = gw.router.choose(call.route, frozenset(tried))
            if nxt is None:
                return error(502, f"no replica of {call.route.deployment!r} answered (tried "
                             f"{len(tried)}; the last: {exc})",
                             "upstream_unreachable", kind="upstream_error")
            replica = nxt
        except TimeoutError:
            replica.in_flight -= 1
            gw.meter.metrics.upstream_errors.labels(call.route.deployment, "timeout").inc()
            return error(504, f"replica {replica.name} did not answer in time",
                         "upstream_timeout", kind="upstream_error")


async def _proxy(request: web.Request, path: str, chat: bool) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    started = time.perf_counter()
    admitted = await _admit(request, gw, chat)
    if isinstance(admitted, web.Response):
        return admitted
    call = admitted
    connected = await _connect(gw, call, path)
    if isinstance(connected, web.Response):
        call.caller.limits.settle(call.charged, 0)
        gw.meter.record(call.caller.key.name, call.route.deployment, connected.status, 0, 0)
        return connected
    replica, resp = connected
    status = resp.status
    prompt = completion = 0
    try:
        if status != 200:
            gw.meter.metrics.upstream_errors.labels(call.route.deployment,
                                                    f"http_{status}").inc()
            try:
                body = await resp.read()
            except (UpstreamBroken, TimeoutError):
                status = 502
                return error(502, f"replica {replica.name} failed while answering {resp.status}",
                             "upstream_failed", kind="upstream_error")
            return web.Response(body=body, status=status, headers={REPLICA_HEADER: replica.name},
                                content_type=resp.content_type or "application/json")
        if call.stream:
            out, prompt, completion = await _stream(request, gw, call, resp, replica)
            return out
        answer, prompt, completion = await _whole(gw, call, resp)
        answer.headers[REPLICA_HEADER] = replica.name
        status = answer.status
        return answer
    finally:
        replica.in_flight -= 1
        resp.release()
        used = prompt + completion
        call.caller.limits.settle(call.charged, used)
        gw.meter.record(call.caller.key.name, call.route.deployment, status, prompt,
                        completion)
        gw.meter.metrics.latency.labels(call.route.deployment).observe(
            time.perf_counter() - started)


async def _whole(gw: Gateway, call: Call, resp: Response
                 ) -> tuple[web.Response, int, int]:
    try:
        raw = await resp.read()
    except (UpstreamBroken, TimeoutError) as exc:
        gw.meter.metrics.upstream_errors.labels(call.route.deployment, "body").inc()
        return (error(502, f"the backend failed while answering: {exc or type(exc).__name__}",
                      "upstream_failed", kind="upstream_error"), call.prompt_estimate, 0)
    try:
        answer = _decode.decode(raw)
    except msgspec.DecodeError:
        return web.Response(body=raw, content_type="application/json"), call.prompt_estimate, 0
    guards = call.guards
    if redact_whole(answer, call.chat, guards.redact if guards is not None else None):
        raw = _encode.encode(answer)
    usage = answer.get("usage") if isinstance(answer, dict) else None
    prompt = call.prompt_estimate
    completion = 0
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens", prompt)
        completion = usage.get("completion_tokens", 0)
    return web.Response(body=raw, content_type="application/json"), prompt, completion


async def _stream(request: web.Request, gw: Gateway, call: Call, resp: Response,
                  replica: Replica) -> tuple[web.StreamResponse, int, int]:
    guards = call.guards
    rewriter = StreamRewriter(call.chat, guards.redactor if guards is not None else None,
                              drop_usage_chunk=not call.client_wants_usage)
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                      "Cache-Control": "no-cache", REPLICA_HEADER: replica.name})
    await out.prepare(request)
    event = b""
    failure: str | None = None
    try:
        async for line in resp.lines():
            if line in (b"\n", b"\r\n"):  # the end of one SSE event: send it now
                if event:  # (an event whose lines were all dropped is not sent at all)
                    await out.write(event + line)
                    event = b""
                continue
            sent = rewriter.line(line)
            if sent is not None:
                event += sent
        if not rewriter.done:
            failure = "the backend closed the stream before [DONE]"
    except ConnectionResetError:  # the client went away: stop reading the backend
        return out, *_stream_usage(call, rewriter)
    except UpstreamBroken as exc:
        failure = f"the backend failed mid-stream: {exc or type(exc).__name__}"
    except TimeoutError:
        failure = f"the backend sent nothing for {gw.config.limits.read_timeout_s:g} s"
    try:
        if event:
            await out.write(event)
        if failure is not None:
            gw.meter.metrics.upstream_errors.labels(call.route.deployment, "stream").inc()
            log.warning("upstream_stream_failed", model=call.route.deployment, error=failure)
            await out.write(rewriter.flush() + sse({"error": {
                "message": failure, "type": "upstream_error", "param": None,
                "code": "upstream_stream_failed"}}))
        await out.write_eof()
    except ConnectionResetError:  # the client went away
        pass
    return out, *_stream_usage(call, rewriter)


def _stream_usage(call: Call, rewriter: StreamRewriter) -> tuple[int, int]:
    """(prompt, completion) tokens: the backend's usage, else the estimate and the chunks."""
    usage = rewriter.usage
    prompt = usage.prompt if usage.prompt is not None else call.prompt_estimate
    completion = usage.completion if usage.completion is not None else usage.chunks
    return prompt, completion


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, "/v1/chat/completions", chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, "/v1/completions", chat=False)


async def models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    caller = gw.caller(request)
    if caller is None:
        return error(401, *_UNAUTHORIZED)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "llmops"}
            for name in gw.router.models() if caller.key.allows(name)]
    return web.json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    router = request.app[GATEWAY].router
    return web.json_response({"status": "ok" if router.refreshed else "starting",
                              "deployments": len(router.replicas)},
                             status=200 if router.refreshed else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[GATEWAY].meter.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason, exc.reason.lower().replace(" ", "_"))
    except asyncio.CancelledError:
        raise
    except Exception:  # the one boundary that turns a bug into a 500, not a dropped link
        log.exception("gateway_error", path=request.path)
        return error(500, "internal gateway error", "internal_error", kind="server_error")


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(middlewares=[openai_errors],
                          client_max_size=gateway.config.limits.max_body_bytes)
    app[GATEWAY] = gateway
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
