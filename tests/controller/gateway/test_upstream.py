"""The gateway's HTTP/1.1 client to its replicas (``controller/gateway/upstream.py``) against
real servers on free ports: raw asyncio servers that write exact bytes, so the framing and the
misbehaviour are the test's to choose, and a real aiohttp server.

A raw replica counts the connections it accepts, records each request with the number of the
connection it came on, and notes when the client closed a connection, so reuse and closing are
asserted from the server's side of the socket rather than from the client's say-so.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import uvloop
from aiohttp import web

from llm_ops_helper.controller.gateway import upstream
from llm_ops_helper.controller.gateway.upstream import (
    ConnectFailed,
    Response,
    Upstream,
    UpstreamBroken,
)
from tests.controller.gateway.harness import free_port, serve

# The read timeout of the tests about timeouts; the others use a generous one, so a loaded
# machine never turns a slow answer into a failure.
SHORT_READ_TIMEOUT_S = 0.3
# How long a test waits for something that should happen at once (an EOF, a pause), so that a
# bug fails an assertion instead of hanging the run. Never reached when the code is right.
EVENTUALLY_S = 5.0
# asyncio's selector transport reads at most this much per data_received.
TRANSPORT_READ_SIZE = 256 * 1024
JSON = b"application/json"


# Every test runs on asyncio's loop and on uvloop's, which llmops-gateway runs on (its
# transports are not asyncio's classes: a first version of this client failed only there).
# The loops come from pytest_asyncio_loop_factories in this folder's conftest.py.
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


# --- a raw replica -------------------------------------------------------------------------

@dataclass(frozen=True)
class Seen:
    """A request as the replica read it."""

    connection: int  # 1 for the first connection the replica accepted
    request_line: str
    headers: dict[str, str]
    body: bytes


# Writes the answer to one request; False closes the connection from the replica's side.
Answer = Callable[["RawReplica", Seen, asyncio.StreamWriter], Awaitable[bool]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes] | None:
    """One request, or None when the client closed the connection between two requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise AssertionError(f"the client closed mid-request after {exc.partial!r}") from None
        return None
    request_line, *header_lines = head.decode("latin-1").removesuffix("\r\n\r\n").split("\r\n")
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(":") for line in header_lines)}
    body = await reader.readexactly(int(headers["content-length"]))
    return request_line, headers, body


class RawReplica:
    """An HTTP/1.1 server on a free port whose answers are exact bytes written by ``answer``."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.accepted = 0
        self.seen: list[Seen] = []
        self.failures: list[BaseException] = []  # the handler's own errors: a broken test
        self.stopping = asyncio.Event()  # answers that hold a connection silent wait on it
        self.request_arrived = asyncio.Event()
        self._client_closed: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self._server_closed: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.stopping.set()
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=EVENTUALLY_S)
        await self._server.wait_closed()

    def client_closed(self, connection: int) -> bool:
        return self._client_closed[connection].is_set()

    async def wait_client_closed(self, connection: int) -> None:
        """Until the client closed ``connection`` (the replica read EOF or a reset on it)."""
        async with asyncio.timeout(EVENTUALLY_S):
            await self._client_closed[connection].wait()

    async def wait_server_closed(self, connection: int) -> None:
        async with asyncio.timeout(EVENTUALLY_S):
            await self._server_closed[connection].wait()

    def requests_on(self, connection: int) -> int:
        return sum(1 for seen in self.seen if seen.connection == connection)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.append(writer)
        self.accepted += 1
        number = self.accepted
        try:
            while (request := await read_request(reader)) is not None:
                self.seen.append(Seen(number, *request))
                self.request_arrived.set()
                if not await self.answer(self, self.seen[-1], writer):
                    return
            self._client_closed[number].set()
        except ConnectionResetError:
            self._client_closed[number].set()
        except Exception as exc:
            if not self.stopping.is_set():
                self.failures.append(exc)
        finally:
            writer.close()
            self._server_closed[number].set()
            self._handlers.discard(handler)


@pytest.fixture
async def replica_factory() -> AsyncIterator[Callable[[Answer], Awaitable[RawReplica]]]:
    started: list[RawReplica] = []

    async def start(answer: Answer) -> RawReplica:
        replica = RawReplica(answer)
        await replica.start()
        started.append(replica)
        return replica

    yield start
    for replica in started:
        await replica.stop()
    failures = [failure for replica in started for failure in replica.failures]
    assert not failures, f"a raw replica's handler failed: {failures!r}"


@pytest.fixture
async def client() -> AsyncIterator[Upstream]:
    pool = Upstream(connect_timeout_s=EVENTUALLY_S, read_timeout_s=EVENTUALLY_S)
    yield pool
    pool.close()


@pytest.fixture
async def impatient_client() -> AsyncIterator[Upstream]:
    pool = Upstream(connect_timeout_s=EVENTUALLY_S, read_timeout_s=SHORT_READ_TIMEOUT_S)
    yield pool
    pool.close()


# --- answers -------------------------------------------------------------------------------

def with_length(body: bytes, *, status: str = "HTTP/1.1 200 OK",
                headers: str = "Content-Type: application/json\r\n") -> bytes:
    return f"{status}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body


CHUNKED_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chunked(*pieces: bytes) -> bytes:
    return CHUNKED_HEAD + b"".join(chunk(piece) for piece in pieces) + LAST_CHUNK


def cut(data: bytes, size: int) -> list[bytes]:
    """``data`` in pieces of ``size`` bytes: one TCP write each, wherever the framing falls."""
    return [data[start:start + size] for start in range(0, len(data), size)]


def writing(*writes: bytes, pause_s: float = 0.0, keep: bool = True) -> Answer:
    """An answer that writes ``writes`` in turn (``pause_s`` apart, so they leave as separate
    TCP segments), then keeps the connection for the next request or closes it."""
    async def answer(replica: RawReplica, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        for number, data in enumerate(writes):
            if number and pause_s:
                await asyncio.sleep(pause_s)
            writer.write(data)
            await writer.drain()
        return keep
    return answer


def writing_then_silent(*writes: bytes) -> Answer:
    """Writes ``writes``, then neither writes nor closes: the replica waits for a next request
    and so notices when the client closes the connection."""
    return writing(*writes, keep=True)


async def post(pool: Upstream, replica: RawReplica, body: bytes = b'{"n":1}',
               path: str = "/v1/completions") -> Response:
    return await pool.post(replica.url, path, body)


async def read_all(pool: Upstream, replica: RawReplica, body: bytes = b'{"n":1}') -> bytes:
    response = await post(pool, replica, body)
    try:
        return await response.read()
    finally:
        response.release()


async def collect_lines(response: Response) -> list[bytes]:
    return [line async for line in response.lines()]


async def collect_lines_into(response: Response, lines: list[bytes]) -> None:
    """Like :func:`collect_lines`, keeping the lines read before an error."""
    async for line in response.lines():
        lines.append(line)


# --- 1. reading answers --------------------------------------------------------------------

async def test_the_request_is_a_post_with_host_json_type_and_the_body(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing(with_length(b"{}")))
    await read_all(client, replica, body=b'{"model":"m","prompt":"hi"}')
    [seen] = replica.seen
    assert seen.request_line == "POST /v1/completions HTTP/1.1"
    assert seen.headers["host"] == f"127.0.0.1:{replica.port}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.body == b'{"model":"m","prompt":"hi"}'


async def test_content_length_answer_is_read_whole_with_status_and_bare_content_type(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    body = b'{"choices":[{"text":"hello"}]}'
    replica = await replica_factory(writing(with_length(
        body, headers="Content-Type: application/json; charset=utf-8\r\n")))
    response = await post(client, replica)
    try:
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.read() == body
    finally:
        response.release()


@pytest.mark.parametrize(("answer", "status", "body"), [
    (with_length(b'{"error":"busy"}', status="HTTP/1.1 503 Service Unavailable"),
     503, b'{"error":"busy"}'),
    (with_length(b"", status="HTTP/1.1 200 OK"), 200, b""),
    (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
], ids=["503-with-body", "empty-body", "204"])
async def test_status_and_body_of_other_answers(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]],
        answer: bytes, status: int, body: bytes) -> None:
    replica = await replica_factory(writing(answer))
    response = await post(client, replica)
    try:
        assert response.status == status
        assert await response.read() == body
    finally:
        response.release()


async def test_chunked_answer_is_read_whole(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    pieces = [b'{"choices":', b'[{"text":', b'"hello"}]}']
    replica = await replica_factory(writing(
        CHUNKED_HEAD, *(chunk(piece) for piece in pieces), LAST_CHUNK, pause_s=0.02))
    response = await post(client, replica)
    try:
        assert response.content_type == "text/event-stream"
        assert await response.read() == b"".join(pieces)
    finally:
        response.release()


async def test_lines_split_across_chunks_and_tcp_writes_come_out_whole(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    # Lines split across chunks, a chunk holding several lines, a last line without "\n";
    # and the whole byte stream (head included) cut into 7-byte TCP writes, so header names,
    # chunk sizes and lines all straddle writes.
    stream = chunked(b'data: {"a":1}\n\nda', b"ta: ", b'{"b":2}\n', b"\n",
                     b"data: [DONE]\n\nevent: x\ndata: y\n", b"\nlast without newline")
    replica = await replica_factory(writing(*cut(stream, 7), pause_s=0.005))
    response = await post(client, replica)
    try:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        assert await collect_lines(response) == [
            b'data: {"a":1}\n', b"\n", b'data: {"b":2}\n', b"\n", b"data: [DONE]\n", b"\n",
            b"event: x\n", b"data: y\n", b"\n", b"last without newline"]
    finally:
        response.release()


async def test_lines_of_a_content_length_answer(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing(*cut(with_length(b"one\ntwo\n\nthree"), 5),
                                            pause_s=0.005))
    response = await post(client, replica)
    try:
        assert await collect_lines(response) == [b"one\n", b"two\n", b"\n", b"three"]
    finally:
        response.release()


def aiohttp_replica_app(client_ports: list[int]) -> web.Application:
    async def complete(request: web.Request) -> web.StreamResponse:
        client_ports.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        assert request.content_type == "application/json"
        payload = await request.json()
        if not payload.get("stream"):
            return web.json_response({"echo": payload})
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        for number in range(3):
            await stream.write(b"data: %d\n\n" % number)
            await asyncio.sleep(0.01)
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    return app


async def test_real_aiohttp_replica_answers_whole_and_streamed(client: Upstream) -> None:
    client_ports: list[int] = []
    runner, url = await serve(aiohttp_replica_app(client_ports))
    try:
        whole = await client.post(url, "/v1/completions", b'{"prompt":"hi"}')
        try:
            assert (whole.status, whole.content_type) == (200, "application/json")
            assert await whole.read() == b'{"echo": {"prompt": "hi"}}'
        finally:
            whole.release()
        streamed = await client.post(url, "/v1/completions", b'{"stream":true}')
        try:
            assert (streamed.status, streamed.content_type) == (200, "text/event-stream")
            assert await collect_lines(streamed) == [
                b"data: 0\n", b"\n", b"data: 1\n", b"\n", b"data: 2\n", b"\n",
                b"data: [DONE]\n", b"\n"]
        finally:
            streamed.release()
    finally:
        await runner.cleanup()


# --- 2. keep-alive -------------------------------------------------------------------------

@pytest.mark.parametrize("answer", [
    with_length(b'{"ok":true}'),
    chunked(b'{"ok":', b"true}"),
    with_length(b'{"ok":true}', status="HTTP/1.0 200 OK",
                headers="Content-Type: application/json\r\nConnection: keep-alive\r\n"),
], ids=["content-length", "chunked", "http/1.0-keep-alive"])
async def test_sequential_requests_reuse_one_connection(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]],
        answer: bytes) -> None:
    replica = await replica_factory(writing(answer))
    for _ in range(3):
        assert await read_all(client, replica) == b'{"ok":true}'
    assert replica.accepted == 1
    assert [seen.connection for seen in replica.seen] == [1, 1, 1]
    assert not replica.client_closed(1)


async def test_real_aiohttp_replica_connection_is_reused(client: Upstream) -> None:
    client_ports: list[int] = []
    runner, url = await serve(aiohttp_replica_app(client_ports))
    try:
        for body in (b"{}", b'{"stream":true}', b"{}"):
            response = await client.post(url, "/v1/completions", body)
            try:
                await response.read()
            finally:
                response.release()
    finally:
        await runner.cleanup()
    assert len(client_ports) == 3
    assert len(set(client_ports)) == 1, f"one connection expected, client ports {client_ports}"


@pytest.mark.parametrize("answer", [
    with_length(b'{"ok":true}', headers="Connection: close\r\n"),
    with_length(b'{"ok":true}', status="HTTP/1.0 200 OK"),
], ids=["connection-close", "http/1.0"])
async def test_answer_that_does_not_keep_alive_is_not_reused_and_is_closed(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]],
        answer: bytes) -> None:
    # The replica keeps its side open: closing is the client's doing.
    replica = await replica_factory(writing(answer, keep=True))
    assert await read_all(client, replica) == b'{"ok":true}'
    await replica.wait_client_closed(1)
    assert await read_all(client, replica) == b'{"ok":true}'
    assert replica.accepted == 2
    assert [seen.connection for seen in replica.seen] == [1, 2]


async def test_answer_delimited_by_the_connection_closing_is_read_whole(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    # Neither Content-Length nor chunked: the body runs until the replica closes (RFC 9112
    # section 6.3, rule 8), as an HTTP/1.0 server may answer.
    replica = await replica_factory(writing(
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n", b'{"ok":',
        b"true}", pause_s=0.02, keep=False))
    response = await post(client, replica)
    try:
        assert response.status == 200
        assert await response.read() == b'{"ok":true}'
    finally:
        response.release()


@pytest.mark.parametrize(("answer", "lines_to_read"), [
    (writing_then_silent(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x" * 10), 0),
    (writing_then_silent(CHUNKED_HEAD, chunk(b"data: 1\n\n")), 1),
], ids=["content-length-unread", "chunked-one-line-read"])
async def test_answer_released_before_its_end_closes_the_connection(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]],
        answer: Answer, lines_to_read: int) -> None:
    replica = await replica_factory(answer)
    response = await post(client, replica)
    lines = response.lines()
    for _ in range(lines_to_read):
        assert await anext(lines) == b"data: 1\n"
    await lines.aclose()
    response.release()
    await replica.wait_client_closed(1)

    replica.answer = writing(with_length(b"{}"))
    assert await read_all(client, replica) == b"{}"
    assert replica.accepted == 2


async def test_release_is_idempotent(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing(with_length(b"{}")))
    response = await post(client, replica)
    await response.read()
    response.release()
    response.release()
    first, second = await post(client, replica), await post(client, replica)
    try:
        # Released twice but pooled once: two requests at a time need two connections.
        assert replica.accepted == 2
    finally:
        first.release()
        second.release()


# --- 3. stale kept-alive connections -------------------------------------------------------

async def test_connection_the_replica_closed_while_idle_is_replaced(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    # The replica answers with keep-alive, then closes the connection (its idle timeout).
    replica = await replica_factory(writing(with_length(b"{}"), keep=False))
    assert await read_all(client, replica, body=b'{"n":1}') == b"{}"
    await replica.wait_server_closed(1)

    assert await read_all(client, replica, body=b'{"n":2}') == b"{}"
    assert replica.accepted == 2
    assert [(seen.connection, seen.body) for seen in replica.seen] == [
        (1, b'{"n":1}'), (2, b'{"n":2}')]


def closing_second_request_on_first_connection(how: str) -> Answer:
    """Answers, except the second request on connection 1, which it reads and then drops
    unanswered (FIN, or RST with a zero linger): the replica's idle close racing the request."""
    async def answer(replica: RawReplica, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.connection == 1 and replica.requests_on(1) == 2:
            if how == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            return False
        writer.write(with_length(b"{}"))
        await writer.drain()
        return True
    return answer


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_kept_alive_connection_dropped_as_the_request_arrives_is_retried_once_on_a_new_one(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]],
        how: str) -> None:
    replica = await replica_factory(closing_second_request_on_first_connection(how))
    assert await read_all(client, replica, body=b'{"n":1}') == b"{}"
    assert await read_all(client, replica, body=b'{"n":2}') == b"{}"
    # Not lost: seen on the dropped connection (unanswered), then once on a new one.
    assert [(seen.connection, seen.body) for seen in replica.seen] == [
        (1, b'{"n":1}'), (1, b'{"n":2}'), (2, b'{"n":2}')]
    assert replica.accepted == 2


async def test_fresh_connection_closed_before_answering_is_connect_failed_and_not_retried(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing(keep=False))
    with pytest.raises(ConnectFailed, match="closed the connection before answering"):
        await post(client, replica)
    assert len(replica.seen) == 1
    assert replica.accepted == 1


async def test_kept_alive_connection_broken_mid_answer_is_upstream_broken_and_not_retried(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    async def answer(replica: RawReplica, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if len(replica.seen) == 1:
            writer.write(with_length(b"{}"))
            await writer.drain()
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"partial")
        await writer.drain()
        return False

    replica = await replica_factory(answer)
    assert await read_all(client, replica) == b"{}"
    response = await post(client, replica)
    try:
        with pytest.raises(UpstreamBroken, match="mid-answer"):
            await response.read()
    finally:
        response.release()
    assert len(replica.seen) == 2


# --- 4. connecting -------------------------------------------------------------------------

async def test_connection_refused_is_connect_failed(client: Upstream) -> None:
    port = free_port()  # bound, then released: nothing listens there
    with pytest.raises(ConnectFailed, match=rf"127\.0\.0\.1:{port}: Connection refused"):
        await client.post(f"http://127.0.0.1:{port}", "/v1/completions", b"{}")


async def fill_backlog(port: int) -> list[asyncio.StreamWriter]:
    """Connections to a listener that never accepts, until one cannot complete its handshake:
    from then on the kernel drops new SYNs to that port (the accept queue is full)."""
    fillers: list[asyncio.StreamWriter] = []
    for _ in range(64):
        try:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
        except TimeoutError:
            return fillers
        fillers.append(writer)
    raise AssertionError(f"the accept queue of port {port} never filled")


async def test_connect_timeout_is_connect_failed() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = await fill_backlog(port)
    pool = Upstream(connect_timeout_s=0.3, read_timeout_s=EVENTUALLY_S)
    try:
        with pytest.raises(ConnectFailed, match=rf"no connection to 127\.0\.0\.1:{port} "
                                                r"within 0\.3 s"):
            await pool.post(f"http://127.0.0.1:{port}", "/v1/completions", b"{}")
    finally:
        pool.close()
        for writer in fillers:
            writer.close()
        listener.close()


@pytest.mark.parametrize("url", ["https://127.0.0.1:8000", "127.0.0.1:8000", "http://"])
async def test_address_that_is_not_http_is_connect_failed(client: Upstream, url: str) -> None:
    with pytest.raises(ConnectFailed, match="is not an http://host:port address"):
        await client.post(url, "/v1/completions", b"{}")


# --- 5. broken answers and timeouts --------------------------------------------------------

@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"text":"cut',
    CHUNKED_HEAD + chunk(b'{"text":') + b"20\r\ncut",
], ids=["content-length", "chunked"])
async def test_answer_broken_mid_body_is_upstream_broken_from_read(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]],
        answer: bytes) -> None:
    replica = await replica_factory(writing(answer, keep=False))
    response = await post(client, replica)
    try:
        with pytest.raises(UpstreamBroken, match="closed the connection mid-answer"):
            await response.read()
    finally:
        response.release()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"data: 1\n\ndata: 2",
    CHUNKED_HEAD + chunk(b"data: 1\n\n") + chunk(b"data: 2"),
], ids=["content-length", "chunked"])
async def test_answer_broken_mid_body_is_upstream_broken_from_lines_after_whole_lines(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]],
        answer: bytes) -> None:
    replica = await replica_factory(writing(answer, keep=False))
    response = await post(client, replica)
    lines: list[bytes] = []
    try:
        with pytest.raises(UpstreamBroken, match="closed the connection mid-answer"):
            await collect_lines_into(response, lines)
    finally:
        response.release()
    assert lines == [b"data: 1\n", b"\n"]  # never the cut-off "data: 2"


async def test_garbage_instead_of_http_is_upstream_broken_and_closed(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", keep=True))
    with pytest.raises(UpstreamBroken, match="not HTTP"):
        await post(client, replica)
    await replica.wait_client_closed(1)


async def test_bad_chunk_framing_after_headers_is_upstream_broken_from_read(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing(CHUNKED_HEAD, b"zz\r\nnot a chunk\r\n",
                                            pause_s=0.02, keep=True))
    response = await post(client, replica)
    try:
        with pytest.raises(UpstreamBroken, match="not HTTP"):
            await response.read()
    finally:
        response.release()
    await replica.wait_client_closed(1)


async def test_headers_then_silence_is_timeout_from_read_and_closes(
        impatient_client: Upstream,
        replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing_then_silent(
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"))
    response = await post(impatient_client, replica)
    try:
        assert response.status == 200
        with pytest.raises(TimeoutError):
            await response.read()
    finally:
        response.release()
    await replica.wait_client_closed(1)


async def test_silence_mid_stream_is_timeout_from_lines(
        impatient_client: Upstream,
        replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing_then_silent(CHUNKED_HEAD, chunk(b"data: 1\n\n")))
    response = await post(impatient_client, replica)
    lines: list[bytes] = []
    try:
        with pytest.raises(TimeoutError):
            await collect_lines_into(response, lines)
    finally:
        response.release()
    assert lines == [b"data: 1\n", b"\n"]
    await replica.wait_client_closed(1)


async def test_silence_before_headers_is_timeout_from_post_and_closes(
        impatient_client: Upstream,
        replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing_then_silent(b"HTTP/1.1 200 OK\r\nContent-Le"))
    with pytest.raises(TimeoutError):
        await post(impatient_client, replica)
    await replica.wait_client_closed(1)


# --- 6. backpressure -----------------------------------------------------------------------

async def wait_until_paused(response: Response) -> None:
    async with asyncio.timeout(EVENTUALLY_S):
        while not response._conn.paused:
            await asyncio.sleep(0.005)


async def test_slow_reader_pauses_the_replica_and_gets_every_byte_in_order(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    sent = [b"%07d %s\n" % (number, b"x" * 91) for number in range(20_480)]  # 2 MB of lines
    body = b"".join(sent)
    replica = await replica_factory(writing(
        CHUNKED_HEAD, *(chunk(piece) for piece in cut(body, 65_536)), LAST_CHUNK))
    response = await post(client, replica)
    conn = response._conn
    assert conn.transport is not None
    try:
        # Nobody reads yet: past HIGH_WATER the client stops reading the socket, and then
        # holds what it had, however long it waits.
        await wait_until_paused(response)
        assert not conn.transport.is_reading()
        held = conn.buffered
        assert upstream.HIGH_WATER < held <= upstream.HIGH_WATER + TRANSPORT_READ_SIZE
        await asyncio.sleep(0.1)
        assert conn.buffered == held

        received: list[bytes] = []
        most_held = held
        pauses = 1
        async for line in response.lines():
            received.append(line)
            most_held = max(most_held, conn.buffered)
            if len(received) % 2_000 == 0:  # a slow reader: the replica gets ahead again
                await asyncio.sleep(0.02)
                if conn.paused:
                    pauses += 1
        assert len(received) == len(sent)
        assert received == sent
        assert most_held <= upstream.HIGH_WATER + TRANSPORT_READ_SIZE
        assert pauses >= 1
        assert conn.transport.is_reading()  # resumed once the reader caught up
    finally:
        response.release()


async def test_answer_completed_while_paused_then_released_unread_leaves_the_next_answer_readable(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    # The last bytes of a big answer arrive in the read that crosses HIGH_WATER: the answer is
    # complete and the transport paused. Released unread, the connection may go back to the
    # pool, but then it must read the next answer.
    size = upstream.HIGH_WATER + 100
    first_part = b"a" * (size - 200)

    async def answer(replica: RawReplica, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if len(replica.seen) == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + first_part)
            await writer.drain()
            await first_part_taken.wait()
            writer.write(b"a" * 200)
        else:
            writer.write(with_length(b"{}"))
        await writer.drain()
        return True

    first_part_taken = asyncio.Event()
    replica = await replica_factory(answer)
    response = await post(client, replica)
    conn = response._conn
    async with asyncio.timeout(EVENTUALLY_S):
        while conn.buffered < len(first_part):
            await asyncio.sleep(0.005)
    assert not conn.paused
    first_part_taken.set()
    async with asyncio.timeout(EVENTUALLY_S):
        while not conn.complete:
            await asyncio.sleep(0.005)
    assert conn.paused
    response.release()

    assert await read_all(client, replica) == b"{}"  # not a TimeoutError


# --- 7. idle connections -------------------------------------------------------------------

async def test_connection_idle_longer_than_idle_s_is_closed_not_reused(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "IDLE_S", 0.2)
    replica = await replica_factory(writing(with_length(b"{}")))
    assert await read_all(client, replica) == b"{}"
    assert await read_all(client, replica) == b"{}"  # at once: reused
    assert replica.accepted == 1
    await asyncio.sleep(0.3)
    assert await read_all(client, replica) == b"{}"
    assert replica.accepted == 2
    assert [seen.connection for seen in replica.seen] == [1, 1, 2]
    await replica.wait_client_closed(1)


async def hold_two(pool: Upstream, replica: RawReplica) -> None:
    """Two requests at once (so on two connections), read, then both released."""
    first, second = await post(pool, replica), await post(pool, replica)
    try:
        assert await first.read() == b"{}"
        assert await second.read() == b"{}"
    finally:
        first.release()
        second.release()


async def test_max_idle_per_replica_keeps_at_most_that_many(
        replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing(with_length(b"{}")))
    pool = Upstream(connect_timeout_s=EVENTUALLY_S, read_timeout_s=EVENTUALLY_S,
                    max_idle_per_replica=1)
    try:
        await hold_two(pool, replica)
        assert replica.accepted == 2
        await replica.wait_client_closed(2)  # the second released found the pool full
        assert not replica.client_closed(1)

        await hold_two(pool, replica)  # one kept connection reused, one new
        assert replica.accepted == 3
        assert [seen.connection for seen in replica.seen] == [1, 2, 1, 3]
    finally:
        pool.close()
    await replica.wait_client_closed(1)  # close() closes the idle one


async def test_idle_connections_are_kept_per_replica_and_reused(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing(with_length(b"{}")))
    other = await replica_factory(writing(with_length(b"{}")))
    await hold_two(client, replica)
    await hold_two(client, other)
    await hold_two(client, replica)
    await hold_two(client, other)
    assert (replica.accepted, other.accepted) == (2, 2)


# --- 8. cancellation -----------------------------------------------------------------------

async def test_cancelling_post_waiting_for_headers_closes_the_connection(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing_then_silent())
    waiting = asyncio.create_task(post(client, replica))
    async with asyncio.timeout(EVENTUALLY_S):
        await replica.request_arrived.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await replica.wait_client_closed(1)

    replica.answer = writing(with_length(b"{}"))
    assert await read_all(client, replica) == b"{}"
    assert replica.accepted == 2


async def test_cancelling_read_mid_body_then_release_closes_the_connection(
        client: Upstream, replica_factory: Callable[[Answer], Awaitable[RawReplica]]) -> None:
    replica = await replica_factory(writing_then_silent(
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"))
    response = await post(client, replica)
    reading = asyncio.create_task(response.read())
    async with asyncio.timeout(EVENTUALLY_S):
        while response._conn.waiter is None:  # until read() waits for the rest
            await asyncio.sleep(0.005)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    response.release()
    await replica.wait_client_closed(1)
