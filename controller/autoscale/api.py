"""``GET /api/v1/deployments/{name}/decisions``: the autoscaler's decisions, newest first.

``?limit=N`` (1..10000, default 100). A deployment that never existed answers 404; one deleted
since still shows its decisions until they are pruned.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from llm_ops_helper.controller.autoscale.autoscaler import Autoscaler

AUTOSCALER: web.AppKey[Autoscaler] = web.AppKey("autoscaler", Autoscaler)


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


async def decisions(request: web.Request) -> web.Response:
    autoscaler = request.app[AUTOSCALER]
    name = request.match_info["name"]
    raw = request.query.get("limit", "100")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 5) or not 1 <= int(raw) <= 10_000:
        return _error(f"parameter 'limit': expected an integer 1..10000, got {raw!r}", 400)
    rows = autoscaler.decisions(name, int(raw))
    d = autoscaler.engine.deployments.get(name)
    if d is None and not rows:
        return _error(f"no deployment named {name!r} (GET /api/v1/deployments lists them)", 404)
    mode = d.spec.autoscale.mode if d is not None else None
    body = (b'{"deployment":' + msgspec.json.encode(name) + b',"mode":'
            + msgspec.json.encode(mode)
            + b',"decisions":[' + b",".join(rows) + b'],"count":' + str(len(rows)).encode()
            + b"}")
    return web.Response(body=body, content_type="application/json")


def add_routes(app: web.Application, autoscaler: Autoscaler) -> None:
    app[AUTOSCALER] = autoscaler
    app.router.add_get("/api/v1/deployments/{name}/decisions", decisions)
