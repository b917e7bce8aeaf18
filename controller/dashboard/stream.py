"""``GET /api/v1/stream``: the overview as Server-Sent Events, one a second (the first at once).

Each event is ``event: overview`` with the JSON of :func:`.overview.overview`; a ``: keep-alive``
comment opens the stream and recurs, so that proxies with idle timeouts keep it open.

One :class:`Feed` per app computes and encodes the overview once a tick, only while a stream is
open, and every open stream writes the same bytes: the cost on the controller's loop does not
grow with the number of browser tabs. A stream ends when

- its token is revoked (checked again every :data:`AUTH_RECHECK_EVERY` events: the page
  reconnects, is refused, and signs out);
- its client does not take an event within :data:`WRITE_TIMEOUT_S` (the connection is
  aborted: a tab that stopped reading holds no buffer and no handler);
- the app shuts down (:func:`add_routes` registers the signal): streams end cleanly, and those
  whose client is not keeping up are aborted, so stopping the controller never waits on a tab.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from aiohttp import web

from llm_ops_helper.controller.auth import CALLER
from llm_ops_helper.controller.dashboard.overview import CACHE, STATE, OverviewCache
from llm_ops_helper.controller.state import ControllerState

INTERVAL_S = 1.0
KEEP_ALIVE_EVERY = 15  # events between two keep-alive comments
AUTH_RECHECK_EVERY = 5  # events between two checks that the stream's token still holds
WRITE_TIMEOUT_S = 10.0  # a client that takes no event for this long is dropped
KEEP_ALIVE = b": keep-alive\n\n"


@dataclass(eq=False)
class OpenStream:
    request: web.Request
    writing: bool = False


@dataclass(eq=False)
class Feed:
    """The overview, computed and encoded once a tick for all open streams."""

    cache: OverviewCache
    version: int = 0
    chunk: bytes = b""
    error: BaseException | None = None
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    streams: set[OpenStream] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    started_at_version: int = 0

    def join(self, stream: OpenStream) -> int:
        """Registers a stream; the version it has seen. A running feed's latest is still to
        send (at most a tick old); one left from before the feed (re)started is not."""
        self.streams.add(stream)
        if self.task is None or self.task.done():
            self.error = None
            self.started_at_version = self.version
            self.task = asyncio.create_task(self._run(), name="dashboard-feed")
        return max(self.version - 1, self.started_at_version)

    def leave(self, stream: OpenStream) -> None:
        self.streams.discard(stream)

    async def _run(self) -> None:
        while self.streams and not self.closing.is_set():
            try:
                chunk = b"event: overview\ndata: " + self.cache.refresh() + b"\n\n"
            except Exception as exc:  # every stream raises it (logged there) and ends
                self.error = exc
                await self._publish()
                return
            self.chunk = chunk
            self.version += 1
            await self._publish()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), INTERVAL_S)

    async def _publish(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def next(self, seen: int) -> tuple[int, bytes] | None:
        """The first version after ``seen`` and its bytes; None once closing."""
        async with self.changed:
            await self.changed.wait_for(
                lambda: self.version > seen or self.closing.is_set() or self.error is not None)
        if self.error is not None:
            raise RuntimeError("the dashboard overview failed") from self.error
        return None if self.closing.is_set() else (self.version, self.chunk)

    async def close(self) -> None:
        """Ends every stream: the waiting ones at once, the ones stuck writing to a client that
        does not read by aborting their connection."""
        self.closing.set()
        await self._publish()
        for stream in list(self.streams):
            if _backed_up(stream.request):
                _abort(stream.request)
        if self.task is not None:
            await self.task


FEED: web.AppKey[Feed] = web.AppKey("dashboard_feed", Feed)


def open_streams(app: web.Application) -> int:
    """How many streams are open now."""
    return len(app[FEED].streams)


def _backed_up(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and transport.get_write_buffer_size() > 0


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def token_holds(request: web.Request) -> bool:
    """Whether the bearer token that opened the stream is still known and not revoked (always
    true in an app built without the auth middleware, which authenticates nobody)."""
    if CALLER not in request:
        return True
    _, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    found = request.app[STATE].tokens.lookup(value.strip())
    return found is not None and not found.revoked


async def _send(stream: OpenStream, response: web.StreamResponse, chunk: bytes) -> None:
    stream.writing = True
    try:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await response.write(chunk)
    except TimeoutError:
        _abort(stream.request)
        raise ConnectionError("the client took no event in time") from None
    finally:
        stream.writing = False


async def stream(request: web.Request) -> web.StreamResponse:
    feed = request.app[FEED]
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})  # nginx: pass each event on at once
    await response.prepare(request)
    mine = OpenStream(request)
    seen = feed.join(mine)
    sent = 0
    try:
        while (got := await feed.next(seen)) is not None:
            seen, chunk = got
            if sent and sent % AUTH_RECHECK_EVERY == 0 and not token_holds(request):
                break  # revoked: the page's next connection is refused
            await _send(mine, response, KEEP_ALIVE + chunk if sent % KEEP_ALIVE_EVERY == 0
                        else chunk)
            sent += 1
        if _backed_up(request):
            _abort(request)  # closing, and this client is not keeping up
        else:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await response.write_eof()
    except TimeoutError:
        _abort(request)
    except ConnectionError:
        pass  # the client went away, or was dropped
    finally:
        feed.leave(mine)
    return response


async def _close_streams(app: web.Application) -> None:
    await app[FEED].close()


def add_routes(app: web.Application, state: ControllerState) -> None:
    app[FEED] = Feed(app[CACHE])
    app.on_shutdown.append(_close_streams)
    app.router.add_get("/api/v1/stream", stream)
