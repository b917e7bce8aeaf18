"""The controller's live dashboard: ``GET /api/v1/overview``, its live stream
``GET /api/v1/stream`` (Server-Sent Events) and the page itself (``GET /``, ``GET /ui/{file}``).
"""

from __future__ import annotations

from aiohttp import web

from llm_ops_helper.controller.dashboard import static_files, stream
from llm_ops_helper.controller.dashboard.overview import CACHE, STATE, OverviewCache, get_overview
from llm_ops_helper.controller.state import ControllerState


def add_routes(app: web.Application, state: ControllerState) -> None:
    app[STATE] = state
    app[CACHE] = OverviewCache(state)
    app.router.add_get("/api/v1/overview", get_overview)
    stream.add_routes(app, state)
    static_files.add_routes(app)
