"""The gateway's 502 and 504: a replica that fails before it answers gets the client an
OpenAI error body, whole or streamed, counted by kind on /metrics and metered with its status.

- 502 ``upstream_unreachable``: the replica dies while it holds the request (a real simulator
  process, SIGKILLed), or no listed replica accepts a connection; each is tried once.
- 502 ``upstream_failed``: the replica sends its status line, then its body breaks off.
- 504 ``upstream_timeout``: the replica accepts the connection and never answers (a real
  simulator with ``faults.hang``) within ``limits.read_timeout_s``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from tests.controller.gateway.harness import (
    KEY_A,
    FakeController,
    RunningGateway,
    SimReplica,
    free_port,
    gateway_config,
    running_gateway,
    serve,
)

KEYS = KEY_A
# Long enough that a request is still waiting for its first token when the test acts.
NEVER_MS = 600_000.0


@pytest.fixture
async def sims() -> AsyncIterator[list[SimReplica]]:
    started: list[SimReplica] = []
    yield started
    for sim in started:
        if sim.process.poll() is None:
            sim.kill()


async def post(gw: RunningGateway, model: str, *, chat: bool, stream: bool
               ) -> aiohttp.ClientResponse:
    body: dict[str, Any] = {"model": model, "max_tokens": 4, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return await gw.session.post(gw.url + path, json=body, headers=gw.headers())


async def openai_error(resp: aiohttp.ClientResponse, status: int, code: str) -> str:
    """The error's message, once its status, shape, type and code are as expected."""
    text = await resp.text()
    assert resp.status == status, text
    assert resp.headers["Content-Type"].startswith("application/json"), text
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["type"], body["error"]["code"]) == ("upstream_error", code), body
    message: str = body["error"]["message"]
    return message


async def metrics_page(gw: RunningGateway) -> str:
    return await (await gw.session.get(gw.url + "/metrics")).text()


async def requests_running(sim: SimReplica) -> float:
    """The simulator's own gauge of requests it is working on."""
    async with aiohttp.ClientSession() as session, session.get(sim.url + "/metrics") as resp:
        page = await resp.text()
    [line] = [ln for ln in page.splitlines() if ln.startswith("vllm:num_requests_running{")]
    return float(line.rsplit(" ", 1)[1])


async def listening(url: str) -> None:
    """Until something accepts TCP connections at ``url`` (a hung server answers nothing)."""
    parts = urlsplit(url)
    async with asyncio.timeout(20):
        while True:
            try:
                _, writer = await asyncio.open_connection(parts.hostname, parts.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def test_a_replica_killed_while_it_holds_the_request_is_502(
        controller: tuple[FakeController, str], sims: list[SimReplica],
        tmp_path: Path) -> None:
    fake, url = controller
    for model in ("whole", "stream"):
        sims.append(SimReplica(tmp_path, model, ttft_base_ms=NEVER_MS))
    await asyncio.gather(*(sim.ready() for sim in sims))
    for sim, model in zip(sims, ("whole", "stream"), strict=True):
        fake.set(model, sim.url)
    async with running_gateway(gateway_config(url, tmp_path, KEYS)) as gw:
        for sim, model in zip(sims, ("whole", "stream"), strict=True):
            asked = asyncio.create_task(post(gw, model, chat=False, stream=model == "stream"))
            async with asyncio.timeout(20):
                while await requests_running(sim) < 1:
                    await asyncio.sleep(0.05)
            assert not asked.done()
            sim.kill()
            message = await openai_error(await asked, 502, "upstream_unreachable")
            assert message == (f"no replica of {model!r} answered (tried 1; the last: the "
                               "replica closed the connection before answering)")
            [replica] = gw.gateway.router.replicas[model]
            assert replica.in_flight == 0
            assert replica.suspect_until > gw.gateway.router.clock()
        page = await metrics_page(gw)
        for model in ("whole", "stream"):
            assert (f'llmops_gateway_upstream_errors_total{{kind="connect",model="{model}"}} 1.0'
                    in page)
            assert (f'llmops_gateway_requests_total{{key="a",model="{model}",status="502"}} 1.0'
                    in page)


async def test_no_replica_accepting_a_connection_is_502_after_trying_each_once(
        controller: tuple[FakeController, str], tmp_path: Path) -> None:
    fake, url = controller
    fake.set("m", f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}")
    async with running_gateway(gateway_config(url, tmp_path, KEYS)) as gw:
        for chat, stream in ((False, False), (False, True), (True, False), (True, True)):
            message = await openai_error(await post(gw, "m", chat=chat, stream=stream), 502,
                                         "upstream_unreachable")
            assert re.fullmatch(r"no replica of 'm' answered \(tried 2; the last: cannot "
                                r"connect to 127\.0\.0\.1:\d+: Connection refused\)", message)
        replicas = gw.gateway.router.replicas["m"]
        assert [r.in_flight for r in replicas] == [0, 0]
        page = await metrics_page(gw)
        # Four requests, each tried on both replicas and on neither twice.
        assert 'llmops_gateway_upstream_errors_total{kind="connect",model="m"} 8.0' in page
        assert 'llmops_gateway_requests_total{key="a",model="m",status="502"} 4.0' in page
        await gw.gateway.meter.flush()
        assert gw.gateway.meter.usage() == [("a", "m", 4, 0, 0)]


async def test_an_answer_that_breaks_off_after_its_status_line_is_502(
        controller: tuple[FakeController, str], tmp_path: Path) -> None:
    fake, url = controller

    async def cut_off(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        status = 500 if body["prompt"] == "fail" else 200
        out = web.StreamResponse(status=status, headers={"Content-Type": "application/json",
                                                         "Content-Length": "1000"})
        await out.prepare(request)
        await out.write(b'{"id": "cmpl-1", "object": "text_completion", "choices": [')
        assert request.transport is not None
        request.transport.close()  # what was written goes out, then the connection ends
        return out

    app = web.Application()
    app.router.add_post("/v1/completions", cut_off)
    runner, backend = await serve(app)
    fake.set("m", backend)
    try:
        async with running_gateway(gateway_config(url, tmp_path, KEYS)) as gw:
            resp = await post(gw, "m", chat=False, stream=False)
            message = await openai_error(resp, 502, "upstream_failed")
            assert message.startswith("the backend failed while answering: "), message
            payload = {"model": "m", "prompt": "fail", "max_tokens": 4}
            resp = await gw.session.post(gw.url + "/v1/completions", json=payload,
                                         headers=gw.headers())
            message = await openai_error(resp, 502, "upstream_failed")
            [replica] = gw.gateway.router.replicas["m"]
            assert message == f"replica {replica.name} failed while answering 500"
            assert replica.in_flight == 0
            page = await metrics_page(gw)
            assert 'llmops_gateway_upstream_errors_total{kind="body",model="m"} 1.0' in page
            assert 'llmops_gateway_upstream_errors_total{kind="http_500",model="m"} 1.0' in page
            assert 'llmops_gateway_requests_total{key="a",model="m",status="502"} 2.0' in page
    finally:
        await runner.cleanup()


async def test_a_replica_that_never_answers_is_504_after_the_read_timeout(
        controller: tuple[FakeController, str], sims: list[SimReplica],
        tmp_path: Path) -> None:
    fake, url = controller
    sims.append(hung := SimReplica(tmp_path, "m", hang=True))
    await listening(hung.url)
    fake.set("m", hung.url)
    config = gateway_config(url, tmp_path, KEYS, read_timeout_s=0.5)
    async with running_gateway(config) as gw:
        [replica] = gw.gateway.router.replicas["m"]
        for chat, stream in ((False, False), (False, True), (True, False), (True, True)):
            message = await openai_error(await post(gw, "m", chat=chat, stream=stream), 504,
                                         "upstream_timeout")
            assert message == f"replica {replica.name} did not answer in time"
        assert replica.in_flight == 0
        page = await metrics_page(gw)
        assert 'llmops_gateway_upstream_errors_total{kind="timeout",model="m"} 4.0' in page
        assert 'llmops_gateway_requests_total{key="a",model="m",status="504"} 4.0' in page
        assert 'kind="connect"' not in page, "a timeout is not a connection failure"
