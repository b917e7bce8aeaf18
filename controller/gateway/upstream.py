"""The gateway's HTTP/1.1 client to its replicas: kept-alive connections, parsed by llhttp.

The gateway asks one thing of a replica: POST a JSON body, then read the answer whole or line
by line as it streams. aiohttp's ClientSession spent about 100 µs of CPU on each such request
in ``bench/gateway.py`` (a request object, timer contexts, header merging, tracing hooks), more
than a third of the gateway's; this client spends about 25 µs. The HTTP itself is parsed by
``httptools`` (llhttp, the parser uvicorn uses): chunked bodies, keep-alive, ``Connection:
close`` and HTTP/1.0 answers are its business, not ours.

Errors say whether the request may go to another replica:

* :class:`ConnectFailed`: the replica never answered a byte (refused, unreachable, the
  connection closed before the status line). Nothing was answered, so it is safe to retry.
  A kept-alive connection the replica had closed meanwhile is retried here once, on a new one.
* :class:`UpstreamBroken`: the answer began and broke off (or was not HTTP).
* :class:`TimeoutError`: nothing arrived for ``read_timeout_s``.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = ["ConnectFailed", "Response", "Upstream", "UpstreamBroken"]

# A streamed answer the client reads slower than the replica writes is held up to this much,
# then the replica is paused (TCP flow control), and resumed below the low mark.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# Kept-alive connections idle longer than this are closed rather than reused: replicas close
# theirs after a while (uvicorn's default is 5 s) and a reused one that was closed is a retry.
IDLE_S = 4.0


class ConnectFailed(ConnectionError):
    """The replica answered nothing: the request can go to another one."""


class UpstreamBroken(ConnectionError):
    """The replica's answer began, then broke off or was not HTTP."""


class _Connection(asyncio.Protocol):
    """One TCP connection to a replica and the answer being read on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.content_type = ""
        self.headers_done = False
        self.framed = False  # a Content-Length or Transfer-Encoding: else it ends at close
        self.complete = False
        self.keep_alive = False
        self.received = False  # any byte of this answer
        self.error: Exception | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but have its methods)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"the replica's answer is not HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.framed and exc is None:
            self.complete = True  # an answer whose end is the connection's (HTTP/1.0 style)
        if not self.complete and self.error is None:
            reason = f": {exc}" if exc else ""
            self._fail(UpstreamBroken(f"the replica closed the connection mid-answer{reason}")
                       if self.received else
                       ConnectFailed(f"the replica closed the connection before answering"
                                     f"{reason}"))
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.decode("latin-1").partition(";")[0].strip()
        elif name in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        # Asked now: once feed_data returns, llhttp has reset its flags for the next answer.
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # the reading side
    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Until something happens (data, the end, an error), at most ``timeout_s``."""
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self.waiter
        finally:
            self.waiter = None

    def take(self) -> bytes:
        """The body bytes received so far (and the replica resumed if it was paused)."""
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self.transport.write(data)

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.error is None and not self.closed

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """A replica's answer: its status and content type, then its body whole or by lines.
    :meth:`release` must be called once done with it (the gateway does in a ``finally``)."""

    def __init__(self, connection: _Connection, upstream: Upstream, key: tuple[str, int]) -> None:
        self._conn, self._upstream, self._key = connection, upstream, key
        self.status = connection.status
        self.content_type = connection.content_type
        self._released = False

    async def read(self) -> bytes:
        conn = self._conn
        parts: list[bytes] = []
        while True:
            if conn.chunks:
                parts.append(conn.take())
            if conn.complete:
                return b"".join(parts)
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._upstream.read_timeout_s)

    async def lines(self) -> AsyncIterator[bytes]:
        """The body line by line, each with its ``\\n`` (a last line without one at the end)."""
        conn = self._conn
        pending = b""
        while True:
            if conn.chunks:
                pending += conn.take()
                start = 0
                while (end := pending.find(b"\n", start)) != -1:
                    yield pending[start:end + 1]
                    start = end + 1
                pending = pending[start:]
                continue  # more may have come while the lines were taken
            if conn.complete:
                if pending:
                    yield pending
                return
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._upstream.read_timeout_s)

    def release(self) -> None:
        """Back to the pool if the answer was read to its end, else the connection is closed
        (the replica stops working on an answer nobody reads)."""
        if self._released:
            return
        self._released = True
        self._upstream._release(self._key, self._conn)


class Upstream:
    """Kept-alive connections to replicas, by address; :meth:`post` sends one request."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float,
                 max_idle_per_replica: int = 256) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_idle = max_idle_per_replica
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._addresses: dict[str, tuple[str, int]] = {}
        self._heads: dict[tuple[tuple[str, int], str], bytes] = {}
        self._closed = False

    def _address(self, base_url: str) -> tuple[str, int]:
        if (address := self._addresses.get(base_url)) is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise ConnectFailed(f"{base_url!r} is not an http://host:port address")
            address = self._addresses[base_url] = (parts.hostname, parts.port or 80)
        return address

    def _head(self, address: tuple[str, int], path: str) -> bytes:
        if (head := self._heads.get((address, path))) is None:
            host = f"[{address[0]}]" if ":" in address[0] else address[0]
            head = self._heads[address, path] = (
                f"POST {path} HTTP/1.1\r\nHost: {host}:{address[1]}\r\n"
                "Content-Type: application/json\r\nContent-Length: ").encode()
        return head

    async def _connect(self, address: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(_Connection, *address)
        except TimeoutError:
            raise ConnectFailed(f"no connection to {address[0]}:{address[1]} within "
                                f"{self.connect_timeout_s:g} s") from None
        except OSError as exc:  # asyncio's strerror is "Connect call failed (...)": say why
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConnectFailed(f"cannot connect to {address[0]}:{address[1]}: "
                                f"{reason}") from None
        return conn

    def _reuse(self, address: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(address)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_S:
                return conn
            conn.close()
        return None

    async def post(self, base_url: str, path: str, body: bytes) -> Response:
        """Send ``body`` to ``base_url + path``; the answer once its headers are in."""
        address = self._address(base_url)
        request = self._head(address, path) + b"%d\r\n\r\n" % len(body) + body
        conn = self._reuse(address)
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect(address)
            conn.send(request)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(self.read_timeout_s)
            except ConnectFailed:
                conn.close()
                if reused:  # closed by the replica while idle: once more, on a new one
                    conn, reused = None, False
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return Response(conn, self, address)

    def _release(self, address: tuple[str, int], conn: _Connection) -> None:
        if self._closed or not conn.reusable():
            conn.close()
            return
        if conn.paused and conn.transport is not None:  # the answer ended while paused
            conn.paused = False
            conn.transport.resume_reading()
        idle = self._idle.setdefault(address, [])
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def close(self) -> None:
        """Close every idle connection (those in use close when released)."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
