"""``GET /api/v1/stream``: the overview as Server-Sent Events, one a second (the first at once).

Each event is ``event: overview`` with the JSON of :func:`.overview.overview`; a ``: keep-alive``
comment opens the stream and recurs, so that proxies with idle timeouts keep it open. Every open
stream ends when the app shuts down (:func:`add_routes` registers the signal), so stopping the
controller never waits on a browser tab.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import web

from llm_ops_helper.controller.dashboard.overview import STATE, overview

INTERVAL_S = 1.0
KEEP_ALIVE_EVERY = 15  # events between two keep-alive comments
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("dashboard_stream_closing", asyncio.Event)


def event(name: str, data: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def stream(request: web.Request) -> web.StreamResponse:
    closing = request.app[CLOSING]
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})  # nginx: pass each event on at once
    await response.prepare(request)
    sent = 0
    try:
        while not closing.is_set():
            chunk = event("overview", overview(request.app[STATE]))
            if sent % KEEP_ALIVE_EVERY == 0:
                chunk = b": keep-alive\n\n" + chunk
            await response.write(chunk)
            sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), INTERVAL_S)
    except (ConnectionResetError, ConnectionError):
        return response  # the client went away
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


async def _close_streams(app: web.Application) -> None:
    app[CLOSING].set()


def add_routes(app: web.Application) -> None:
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_close_streams)
    app.router.add_get("/api/v1/stream", stream)
