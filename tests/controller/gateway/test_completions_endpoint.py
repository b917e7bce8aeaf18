"""``POST /v1/completions`` (text, not chat) through the gateway to a real simulator replica:
the whole answer and the stream carry the replica's text, and the usage is metered."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.controller.gateway.harness import (
    KEY_A,
    FakeController,
    RunningGateway,
    SimReplica,
    gateway_config,
    running_gateway,
    serve,
)

KEYS = KEY_A
# The simulator's words, in order (agent/runtimes/simserver/app.py): max_tokens 4 makes these.
FOUR_TOKENS = "the quick brown fox"
PROMPT = "write me a story"  # 16 characters: 4 prompt tokens at the simulator's 4 a token


@pytest.fixture
async def replica(tmp_path: Path) -> AsyncIterator[SimReplica]:
    sim = SimReplica(tmp_path, "m")
    try:
        await sim.ready()
        yield sim
    finally:
        sim.kill()


async def complete(gw: RunningGateway, **body: Any) -> aiohttp.ClientResponse:
    payload = {"model": "m", "prompt": PROMPT, "max_tokens": 4, **body}
    return await gw.session.post(gw.url + "/v1/completions", json=payload,
                                 headers=gw.headers())


def events(text: str) -> list[str]:
    """The data of each event of an SSE body, in order, read as the SSE spec reads it: a blank
    line ends an event, and one with no data is no event. (The gateway leaves a lone blank
    line where it dropped the usage event it asked for; a spec-following client skips it.)"""
    found: list[str] = []
    data: list[str] = []
    for line in text.split("\n"):
        if line.startswith("data:"):
            data.append(line[len("data:"):].removeprefix(" "))
        elif line == "":
            if data:
                found.append("\n".join(data))
            data = []
        else:
            raise AssertionError(f"not an SSE data line: {line!r}")
    assert not data, f"the body ends inside an event: {data}"
    return found


async def metrics_page(gw: RunningGateway) -> str:
    return await (await gw.session.get(gw.url + "/metrics")).text()


async def test_a_whole_text_completion_comes_back_as_the_replica_made_it_and_is_metered(
        controller: tuple[FakeController, str], replica: SimReplica, tmp_path: Path) -> None:
    fake, url = controller
    fake.set("m", replica.url)
    async with running_gateway(gateway_config(url, tmp_path, KEYS)) as gw:
        resp = await complete(gw)
        assert resp.status == 200, await resp.text()
        [listed] = gw.gateway.router.replicas["m"]
        assert resp.headers["X-LLMOps-Replica"] == listed.name
        body = await resp.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["model"] == "m"
        [choice] = body["choices"]
        assert (choice["text"], choice["finish_reason"]) == (FOUR_TOKENS, "length")
        assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
        await gw.gateway.meter.flush()
        assert gw.gateway.meter.usage() == [("a", "m", 1, 4, 4)]
        page = await metrics_page(gw)
        assert 'llmops_gateway_requests_total{key="a",model="m",status="200"} 1.0' in page
        assert 'llmops_gateway_tokens_total{key="a",kind="prompt",model="m"} 4.0' in page
        assert 'llmops_gateway_tokens_total{key="a",kind="completion",model="m"} 4.0' in page
        assert "llmops_gateway_upstream_errors_total{" not in page


async def test_a_streamed_text_completion_is_relayed_and_its_usage_metered(
        controller: tuple[FakeController, str], replica: SimReplica, tmp_path: Path) -> None:
    fake, url = controller
    fake.set("m", replica.url)
    async with running_gateway(gateway_config(url, tmp_path, KEYS)) as gw:
        # The client did not ask for usage: the gateway asks for it (to meter the stream) and
        # keeps the usage chunk to itself.
        resp = await complete(gw, stream=True)
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = await resp.text()
        payloads = events(text)
        assert payloads[-1] == "[DONE]"
        # The kept usage event leaves no empty event behind: a client that splits on blank
        # lines gets exactly the events.
        assert text.split("\n\n") == [f"data: {p}" for p in payloads] + [""]
        chunks: list[dict[str, Any]] = [json.loads(p) for p in payloads[:-1]]
        assert {c["object"] for c in chunks} == {"text_completion"}
        assert "".join(c["choices"][0]["text"] for c in chunks) == FOUR_TOKENS
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all("usage" not in c for c in chunks)
        await gw.gateway.meter.flush()
        assert gw.gateway.meter.usage() == [("a", "m", 1, 4, 4)]

        # A client that asks for usage gets the replica's usage chunk, before [DONE].
        resp = await complete(gw, stream=True, stream_options={"include_usage": True})
        payloads = events(await resp.text())
        assert payloads[-1] == "[DONE]"
        usage = json.loads(payloads[-2])
        assert usage["choices"] == [] and usage["usage"] == {
            "prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
        await gw.gateway.meter.flush()
        assert gw.gateway.meter.usage() == [("a", "m", 2, 8, 8)]
        page = await metrics_page(gw)
        assert 'llmops_gateway_tokens_total{key="a",kind="completion",model="m"} 8.0' in page


async def test_a_prompt_that_is_not_text_is_refused_before_any_replica_is_asked(
        controller: tuple[FakeController, str], tmp_path: Path) -> None:
    fake, url = controller
    asked: list[Any] = []

    async def record(request: web.Request) -> web.Response:
        asked.append(await request.json())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/completions", record)
    runner, backend = await serve(app)
    fake.set("m", backend)
    try:
        async with running_gateway(gateway_config(url, tmp_path, KEYS)) as gw:
            for prompt in (None, 7, [1, 2], {"text": "hi"}):
                resp = await complete(gw, prompt=prompt)
                assert resp.status == 400, prompt
                error = (await resp.json())["error"]
                assert (error["code"], error["param"]) == ("invalid_value", "prompt"), prompt
    finally:
        await runner.cleanup()
    assert asked == []
