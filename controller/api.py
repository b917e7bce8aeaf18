"""The controller's read API (aiohttp) and its Prometheus ``/metrics``.

Every route but ``/healthz`` needs a bearer token whose role is enough (:mod:`.auth`); every
mutating call lands in the audit log, ``GET /api/v1/audit`` (admin).

Errors are JSON ``{"error": ..., "status": ...}`` naming the parameter or path at fault; a
handler never raises past the middleware. Everything here reads in-memory state or SQLite and
returns: there is no work per request that grows with the fleet beyond listing it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from llm_ops_helper.controller import auth, dashboard, openapi
from llm_ops_helper.controller.autoscale import api as autoscale_api
from llm_ops_helper.controller.deployments import api as deployments_api
from llm_ops_helper.controller.fleet import HostState
from llm_ops_helper.controller.metrics import exposition, registry_for
from llm_ops_helper.controller.registry import api as registry_api
from llm_ops_helper.controller.state import ControllerState
from llm_ops_helper.proto.messages import Alert

_json = msgspec.json.Encoder()
STATE: web.AppKey[ControllerState] = web.AppKey("state", ControllerState)
REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry", CollectorRegistry)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _respond(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(data), status=status,
                        content_type="application/json")


@web.middleware
async def _errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _respond({"error": exc.message, "status": exc.status}, exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = (f"no such path: {request.path}" if exc.status == 404
                   else f"{exc.reason}: {request.method} {request.path}")
        return _respond({"error": message, "status": exc.status}, exc.status)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"parameter {name!r}: expected an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"parameter {name!r}: expected {low}..{high}, got {value}")
    return value


def _float_param(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ApiError(400, f"parameter {name!r}: expected a number (unix seconds), "
                       f"got {raw!r}") from None


def _choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str | None:
    raw = request.query.get(name)
    if raw is not None and raw not in allowed:
        raise ApiError(400, f"parameter {name!r}: expected one of {', '.join(allowed)}, "
                       f"got {raw!r}")
    return raw


def _host_summary(s: HostState) -> dict[str, Any]:
    t = s.telemetry
    return {
        "host": s.host,
        "online": s.online,
        "offline_reason": s.offline_reason,
        "since": s.since,
        "last_ts": t.ts if t else None,
        "interval_s": s.interval_s,
        "gpus": len(t.gpus) if t else len(s.status.gpus) if s.status else 0,
        "replicas": len(t.replicas) if t else 0,
        "agent_version": s.status.agent_version if s.status else None,
    }


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ok = state.link_connected()
    return _respond({"status": "ok" if ok else "degraded", "broker_connected": ok},
                    200 if ok else 503)


async def hosts(request: web.Request) -> web.Response:
    state = request.app[STATE]
    wanted = _choice(request, "state", ("online", "offline"))
    out = [_host_summary(s) for s in sorted(state.fleet.hosts.values(), key=lambda s: s.host)
           if wanted is None or s.online == (wanted == "online")]
    return _respond({"hosts": out, "count": len(out)})


async def host(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["host"]
    s = state.fleet.hosts.get(name)
    if s is None:
        raise ApiError(404, f"no such host: {name!r} (GET /api/v1/hosts lists them)")
    return _respond(_host_summary(s) | {
        "status": s.status,
        "telemetry": s.telemetry,
        "seq_missing": state.fleet.seq.missing(name),
        "replica_state": [{"name": r.name, "runtime": r.runtime, "up": r.up,
                           "started_at": r.started_at, "restarts": len(r.restarts)}
                          for r in s.replicas.values()],
        "events": list(s.events),
        "alerts": [a for a in state.alerts.firing.values() if a.host == name],
    })


async def alerts(request: web.Request) -> web.Response:
    state = request.app[STATE]
    wanted = _choice(request, "state", ("firing", "resolved", "all")) or "firing"
    limit = _int_param(request, "limit", 100, 1, 10_000)
    host_name = request.query.get("host")
    alert_id = request.query.get("id")
    found: list[Alert]
    if alert_id is not None:  # the link in notifications: whatever its state now
        one = state.store.alert(alert_id)
        found = [one] if one is not None else []
    elif wanted == "firing":
        found = sorted((a for a in state.alerts.firing.values()
                        if host_name is None or a.host == host_name),
                       key=lambda a: a.started_at or a.ts, reverse=True)[:limit]
    else:
        found = state.store.alerts(None if wanted == "all" else wanted, host_name, limit)
    return _respond({"alerts": found, "count": len(found)})


async def anomalies(request: web.Request) -> web.Response:
    state = request.app[STATE]
    limit = _int_param(request, "limit", 100, 1, 10_000)
    since = _float_param(request, "since")
    host_name = request.query.get("host")
    rows = state.store.anomalies(host_name, since, limit)
    body = b'{"anomalies":[' + b",".join(rows) + b'],"count":' + str(len(rows)).encode() + b"}"
    return web.Response(body=body, content_type="application/json")


async def audit(request: web.Request) -> web.Response:
    state = request.app[STATE]
    limit = _int_param(request, "limit", 100, 1, 10_000)
    entries = state.tokens.audit_log(_float_param(request, "since"), limit)
    return _respond({"entries": entries, "count": len(entries)})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=exposition(request.app[REGISTRY]), content_type="text/plain",
                        charset="utf-8")


def build_app(state: ControllerState) -> web.Application:
    settings = auth.AuthSettings(metrics_public=state.config.api.metrics_public,
                                 trust_forwarded=state.config.api.trust_forwarded,
                                 signer=state.url_signer)
    # Outermost first: auth sees (and audits) the response _errors made of an error.
    app = web.Application(middlewares=[auth.middleware(state.tokens, settings), _errors])
    app[STATE] = state
    app[REGISTRY] = registry_for(state)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/hosts", hosts)
    app.router.add_get("/api/v1/hosts/{host}", host)
    app.router.add_get("/api/v1/alerts", alerts)
    app.router.add_get("/api/v1/anomalies", anomalies)
    app.router.add_get("/api/v1/audit", audit)
    app.router.add_get("/metrics", metrics)
    registry_api.add_routes(app, state.registry, public_url=lambda: state.public_url)
    deployments_api.add_routes(app, state.deployments)
    autoscale_api.add_routes(app, state.autoscaler)
    dashboard.add_routes(app, state)
    openapi.add_routes(app)
    return app
