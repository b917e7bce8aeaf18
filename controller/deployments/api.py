"""The deployment routes of the controller's HTTP API.

Errors are JSON ``{"error": ..., "status": ...}`` naming the cause, like the rest of the API;
this module maps the engine's exceptions itself, so it does not depend on the app's middleware.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from llm_ops_helper.controller.auth import caller_name
from llm_ops_helper.controller.deployments.errors import DeploymentError, Invalid
from llm_ops_helper.controller.deployments.reconciler import Deployments
from llm_ops_helper.controller.deployments.spec import parse_spec

ENGINE: web.AppKey[Deployments] = web.AppKey("deployments", Deployments)
_json = msgspec.json.Encoder()
_Handler = Callable[[web.Request], Awaitable[web.Response]]


class _Scale(msgspec.Struct, forbid_unknown_fields=True):
    replicas: int


class _Rollback(msgspec.Struct, forbid_unknown_fields=True):
    version: str | None = None


def _respond(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(data), status=status,
                        content_type="application/json")


def _errors(handler: _Handler) -> _Handler:
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except DeploymentError as exc:
            return _respond({"error": exc.message, "status": exc.status}, exc.status)
    return wrapped



async def _body(request: web.Request, type_: type[Any], what: str) -> Any:
    raw = await request.read()
    try:
        return msgspec.json.decode(raw or b"{}", type=type_)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise Invalid(f"{what}: {exc}") from None


async def put_deployment(request: web.Request) -> web.Response:
    spec = parse_spec(await request.read())
    view, created = request.app[ENGINE].apply(request.match_info["name"], spec,
                                              caller_name(request))
    return _respond(view, 201 if created else 200)


async def list_deployments(request: web.Request) -> web.Response:
    return _respond({"deployments": request.app[ENGINE].list_views()})


async def get_deployment(request: web.Request) -> web.Response:
    return _respond(request.app[ENGINE].get(request.match_info["name"]))


async def scale(request: web.Request) -> web.Response:
    body: _Scale = await _body(request, _Scale, 'scale body (expected {"replicas": N})')
    return _respond(request.app[ENGINE].scale(request.match_info["name"], body.replicas,
                                              caller_name(request)))


async def rollback(request: web.Request) -> web.Response:
    body: _Rollback = await _body(request, _Rollback,
                                  'rollback body (expected {} or {"version": "name@N"})')
    return _respond(request.app[ENGINE].rollback(request.match_info["name"], body.version,
                                                 caller_name(request)))


async def delete_deployment(request: web.Request) -> web.Response:
    return _respond(request.app[ENGINE].delete(request.match_info["name"], caller_name(request)),
                    202)


async def endpoints(request: web.Request) -> web.Response:
    return _respond({"endpoints": request.app[ENGINE].endpoints(request.match_info["name"])})


async def history(request: web.Request) -> web.Response:
    raw = request.query.get("limit", "200")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 5) or not 1 <= int(raw) <= 10_000:
        raise Invalid(f"parameter 'limit': expected an integer 1..10000, got {raw!r}")
    return _respond(request.app[ENGINE].history(request.match_info["name"], int(raw)))


def add_routes(app: web.Application, engine: Deployments) -> None:
    app[ENGINE] = engine
    base = "/api/v1/deployments"
    app.router.add_get(base, _errors(list_deployments))
    app.router.add_put(base + "/{name}", _errors(put_deployment))
    app.router.add_get(base + "/{name}", _errors(get_deployment))
    app.router.add_delete(base + "/{name}", _errors(delete_deployment))
    app.router.add_post(base + "/{name}/scale", _errors(scale))
    app.router.add_post(base + "/{name}/rollback", _errors(rollback))
    app.router.add_get(base + "/{name}/endpoints", _errors(endpoints))
    app.router.add_get(base + "/{name}/history", _errors(history))
