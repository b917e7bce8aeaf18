"""The gateway over real HTTP: a controller stand-in, scripted backends and simulator
processes behind it, and every refusal an OpenAI error body with the right status."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.controller.gateway.harness import (
    KEY_A,
    Backend,
    FakeController,
    SimReplica,
    chunk,
    gateway_config,
    running_gateway,
    serve,
    sha,
)

KEYS = KEY_A + f"""
[[keys]]
name = "only-other"
sha256 = "{sha('sk-other')}"
models = ["other"]

[[keys]]
name = "slow"
sha256 = "{sha('sk-slow')}"
rpm = 2

[[keys]]
name = "thin"
sha256 = "{sha('sk-thin')}"
tpm = 100
max_completion_tokens = 90
"""


async def start_backend(backend: Backend, cleanup: list[web.AppRunner]) -> str:
    runner, url = await serve(backend.app())
    cleanup.append(runner)
    return url


@pytest.fixture
async def backends() -> AsyncIterator[list[web.AppRunner]]:
    runners: list[web.AppRunner] = []
    yield runners
    for r in runners:
        await r.cleanup()


def assert_openai_error(body: dict[str, object], code: str) -> None:
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error


async def test_whole_answer_routes_by_model_and_meters(
        controller: tuple[FakeController, str], backends: list[web.AppRunner],
        tmp_path: Path) -> None:
    fake, url = controller
    fake.set("m", await start_backend(Backend("b0"), backends))
    config = gateway_config(url, tmp_path, KEYS)
    async with running_gateway(config) as gw:
        resp = await gw.chat()
        assert resp.status == 200
        body = await resp.json()
        assert body["choices"][0]["message"]["content"] == "hello"
        # A version ref routes to that version's replicas, named as the replicas serve it.
        resp = await gw.chat("m@1")
        assert resp.status == 200 and (await resp.json())["model"] == "m"
        models = await (await gw.session.get(gw.url + "/v1/models",
                                             headers=gw.headers())).json()
        assert [m["id"] for m in models["data"]] == ["m"]
        await gw.gateway.meter.flush()
        assert gw.gateway.meter.usage() == [("a", "m", 2, 6, 4)]
        page = await (await gw.session.get(gw.url + "/metrics")).text()
        assert 'llmops_gateway_requests_total{key="a",model="m",status="200"} 2.0' in page
        assert 'llmops_gateway_tokens_total{key="a",kind="completion",model="m"} 4.0' in page
    assert all(t == "Bearer controller-admin-token" for t in fake.seen_tokens)


async def test_bad_requests_get_openai_errors(controller: tuple[FakeController, str],
                                             backends: list[web.AppRunner],
                                             tmp_path: Path) -> None:
    fake, url = controller
    fake.set("m", await start_backend(Backend("b0"), backends))
    config = gateway_config(url, tmp_path, KEYS, max_body_bytes=2000)
    async with running_gateway(config) as gw:
        post = gw.url + "/v1/chat/completions"
        cases: list[tuple[dict[str, str], bytes, int, str]] = [
            ({}, b"{}", 401, "invalid_api_key"),
            ({"Authorization": "Bearer sk-wrong"}, b"{}", 401, "invalid_api_key"),
            ({"Authorization": "Basic sk-a"}, b"{}", 401, "invalid_api_key"),
            ({**gw.headers(), "Content-Type": "text/plain"}, b"{}", 415,
             "unsupported_media_type"),
            ({**gw.headers(), "Content-Type": "application/json"}, b"{not json", 400,
             "invalid_json"),
            ({**gw.headers(), "Content-Type": "application/json"}, b"[1]", 400,
             "invalid_json"),
            ({**gw.headers(), "Content-Type": "application/json"},
             b'{"model": "m", "messages": [{"content": "' + b"x" * 3000 + b'"}]}', 413,
             "body_too_large"),
            ({**gw.headers(), "Content-Type": "application/json"},
             b'{"model": "nope", "messages": [{"content": "hi"}]}', 404, "model_not_found"),
            ({**gw.headers("sk-other"), "Content-Type": "application/json"},
             b'{"model": "m", "messages": [{"content": "hi"}]}', 404, "model_not_found"),
            ({**gw.headers(), "Content-Type": "application/json"},
             b'{"model": "m", "messages": "hi"}', 400, "invalid_value"),
            ({**gw.headers(), "Content-Type": "application/json"},
             b'{"messages": [{"content": "hi"}]}', 400, "missing_model"),
            ({**gw.headers("sk-thin"), "Content-Type": "application/json"},
             b'{"model": "m", "max_tokens": 500, "messages": [{"content": "hi"}]}', 400,
             "max_tokens_exceeded"),
        ]
        for headers, data, status, code in cases:
            resp = await gw.session.post(post, data=data, headers=headers)
            assert resp.status == status, (headers, data[:40], await resp.text())
            assert_openai_error(await resp.json(), code)
        resp = await gw.session.get(gw.url + "/v1/models")
        assert resp.status == 401
        resp = await gw.session.get(gw.url + "/v1/nothing")
        assert resp.status == 404
        assert_openai_error(await resp.json(), "not_found")
        # The key limited to "other" sees no model.
        models = await (await gw.session.get(gw.url + "/v1/models",
                                             headers=gw.headers("sk-other"))).json()
        assert models["data"] == []


async def test_rate_limits_answer_429_with_retry_after(
        controller: tuple[FakeController, str], backends: list[web.AppRunner],
        tmp_path: Path) -> None:
    fake, url = controller
    fake.set("m", await start_backend(Backend("b0"), backends))
    async with running_gateway(gateway_config(url, tmp_path, KEYS)) as gw:
        # rpm = 2: the third request within the minute waits about 30 s.
        statuses = [(await gw.chat(key="sk-slow")).status for _ in range(2)]
        assert statuses == [200, 200]
        resp = await gw.chat(key="sk-slow")
        assert resp.status == 429
        assert 1 <= int(resp.headers["Retry-After"]) <= 30
        assert_openai_error(await resp.json(), "rate_limit_exceeded")
        assert (await resp.json())["error"]["type"] == "rate_limit_error"
        # tpm = 100: a prompt of ~1 token and max_tokens 90 fits once; the backend used 5, so
        # 96 come back; a request for 90 more is over until the minute refills.
        assert (await gw.chat(key="sk-thin", max_tokens=90)).status == 200
        assert (await gw.chat(key="sk-thin", max_tokens=90)).status == 200
        resp = await gw.chat(key="sk-thin", max_tokens=90)
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
        # Other keys are not affected.
        assert (await gw.chat()).status == 200


async def test_stream_passes_through_chunk_by_chunk(
        controller: tuple[FakeController, str], backends: list[web.AppRunner],
        tmp_path: Path) -> None:
    fake, url = controller
    release = asyncio.Event()

    async def held(out: web.StreamResponse, body: dict[str, object]) -> None:
        await out.write(chunk("first"))
        await release.wait()  # the rest waits until the client has seen the first chunk
        await out.write(chunk(" second"))
        await out.write(chunk(None, "stop"))
        await out.write(b"data: [DONE]\n\n")

    backend = Backend("b0", script=held)
    fake.set("m", await start_backend(backend, backends))
    async with running_gateway(gateway_config(url, tmp_path, KEYS)) as gw:
        resp = await gw.chat(stream=True)
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await resp.content.readuntil(b"\n\n")
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "first"
        assert not release.is_set()
        release.set()
        rest = (await resp.read()).decode()
        events = [e for e in rest.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[0][6:])["choices"][0]["delta"]["content"] == " second"
        # The gateway asked the backend for usage (to meter it) and did not pass it on.
        assert backend.requests[0]["stream_options"] == {"include_usage": True}
        await gw.gateway.meter.flush()
        assert gw.gateway.meter.usage() == [("a", "m", 1, 1, 2)]


async def test_backend_dying_mid_stream_ends_with_an_error_event(
        controller: tuple[FakeController, str], backends: list[web.AppRunner],
        tmp_path: Path) -> None:
    fake, url = controller

    async def dies(out: web.StreamResponse, body: dict[str, object]) -> None:
        await out.write(chunk("partial"))
        await asyncio.sleep(0.05)
        assert out._req is not None and out._req.transport is not None
        out._req.transport.abort()  # as a killed process: the connection just drops

    fake.set("m", await start_backend(Backend("b0", script=dies), backends))
    async with running_gateway(gateway_config(url, tmp_path, KEYS)) as gw:
        resp = await gw.chat(stream=True)
        async with asyncio.timeout(10):
            text = (await resp.read()).decode()
        events = [json.loads(e[6:]) for e in text.split("\n\n") if e]
        assert events[0]["choices"][0]["delta"]["content"] == "partial"
        assert events[-1]["error"]["code"] == "upstream_stream_failed"
        page = await (await gw.session.get(gw.url + "/metrics")).text()
        assert 'llmops_gateway_upstream_errors_total{kind="stream",model="m"} 1.0' in page


async def test_fewest_in_flight_and_round_robin(
        controller: tuple[FakeController, str], backends: list[web.AppRunner],
        tmp_path: Path) -> None:
    fake, url = controller
    release = asyncio.Event()

    async def held(out: web.StreamResponse, body: dict[str, object]) -> None:
        await out.write(chunk("x"))
        await release.wait()
        await out.write(b"data: [DONE]\n\n")

    b0, b1 = Backend("b0", script=held), Backend("b1", script=held)
    fake.set("m", await start_backend(b0, backends), await start_backend(b1, backends))
    async with running_gateway(gateway_config(url, tmp_path, KEYS)) as gw:
        names = [(await (await gw.chat()).json())["backend"] for _ in range(4)]
        assert sorted(names) == ["b0", "b0", "b1", "b1"], "ties taken in turn"
        stream = await gw.chat(stream=True)  # one stream stays open on one backend
        await stream.content.readuntil(b"\n\n")
        busy = "b0" if b0.requests[-1].get("stream") else "b1"
        names = [(await (await gw.chat()).json())["backend"] for _ in range(3)]
        assert busy not in names, "the replica with a request in flight is passed over"
        release.set()
        await stream.read()


async def test_holds_while_scaling_from_zero_then_503(
        controller: tuple[FakeController, str], backends: list[web.AppRunner],
        tmp_path: Path) -> None:
    fake, url = controller
    fake.set("m")  # deployed, no replica ready
    backend_url = await start_backend(Backend("b0"), backends)
    async with running_gateway(gateway_config(url, tmp_path, KEYS, hold_s=30.0)) as gw:
        waiting = asyncio.create_task(gw.chat())
        await asyncio.sleep(0.3)
        assert not waiting.done()
        fake.set("m", backend_url)
        resp = await waiting
        assert resp.status == 200
    fake.set("m")
    async with running_gateway(gateway_config(url, tmp_path, KEYS, hold_s=0.2)) as gw:
        resp = await gw.chat()
        assert resp.status == 503
        assert_openai_error(await resp.json(), "no_replica")


async def test_failover_when_a_sim_replica_is_killed(
        controller: tuple[FakeController, str], tmp_path: Path) -> None:
    fake, url = controller
    replicas = [SimReplica(tmp_path, "m"), SimReplica(tmp_path, "m")]
    try:
        await asyncio.gather(*(r.ready() for r in replicas))
        fake.set("m", *(r.url for r in replicas))
        async with running_gateway(gateway_config(url, tmp_path, KEYS)) as gw:
            for _ in range(4):  # both serve, and the gateway holds pooled connections to each
                resp = await gw.chat(max_tokens=2)
                assert resp.status == 200, await resp.text()
            replicas[0].kill()  # the controller has not noticed yet: still listed
            for _ in range(6):
                resp = await gw.chat(max_tokens=2)
                assert resp.status == 200, await resp.text()
                resp = await gw.chat(max_tokens=2, stream=True)
                text = await resp.text()
                assert resp.status == 200 and text.endswith("data: [DONE]\n\n"), text
            page = await (await gw.session.get(gw.url + "/metrics")).text()
            assert 'llmops_gateway_upstream_errors_total{kind="connect",model="m"}' in page
    finally:
        for r in replicas:
            r.kill()


async def test_config_errors_exit_78_naming_the_key(tmp_path: Path) -> None:
    from llm_ops_helper.controller.gateway.__main__ import main
    path = tmp_path / "gateway.toml"
    path.write_text('[controller]\nurl = "http://x"\n[state]\ndir = "s"\n'
                    '[[keys]]\nname = "a"\nsha256 = "nothex"\n')
    assert main(["--config", str(path)]) == 78
    path.write_text('[controller]\nurl = "http://x"\n[state]\ndir = "s"\n'
                    f'[[keys]]\nname = "a"\nsha256 = "{sha("k")}"\nguards = "strict"\n')
    assert main(["--config", str(path)]) == 78


def test_config_error_messages(tmp_path: Path) -> None:
    from llm_ops_helper.controller.gateway.config import ConfigError, parse_config
    with pytest.raises(ConfigError, match=r"keys\[0\]\.sha256"):
        parse_config('[controller]\nurl = "u"\n[state]\ndir = "s"\n'
                     '[[keys]]\nname = "a"\nsha256 = "x"\n', "g.toml")
    with pytest.raises(ConfigError, match=r"keys\[1\].*'a'.*duplicate"):
        parse_config('[controller]\nurl = "u"\n[state]\ndir = "s"\n'
                     f'[[keys]]\nname = "a"\nsha256 = "{sha("1")}"\n'
                     f'[[keys]]\nname = "a"\nsha256 = "{sha("2")}"\n', "g.toml")
    with pytest.raises(ConfigError, match=r"controller\.token_file"):
        parse_config('[controller]\nurl = "u"\ntoken_file = "/nonexistent/t"\n'
                     '[state]\ndir = "s"\n', "g.toml")




async def test_client_leaving_mid_stream_frees_the_replica(
        controller: tuple[FakeController, str], backends: list[web.AppRunner],
        tmp_path: Path) -> None:
    fake, url = controller
    release = asyncio.Event()

    async def held(out: web.StreamResponse, body: dict[str, object]) -> None:
        await out.write(chunk("first"))
        await release.wait()
        for _ in range(50):
            await out.write(chunk(" more"))
            await asyncio.sleep(0)
        await out.write(b"data: [DONE]\n\n")

    fake.set("m", await start_backend(Backend("b0", script=held), backends))
    async with running_gateway(gateway_config(url, tmp_path, KEYS)) as gw:
        resp = await gw.chat(stream=True)
        await resp.content.readuntil(b"\n\n")
        (replica,) = gw.gateway.router.replicas["m"]
        assert replica.in_flight == 1
        resp.close()  # the client hangs up
        release.set()
        async with asyncio.timeout(10):
            while replica.in_flight:
                await asyncio.sleep(0.01)
        assert (await gw.chat()).status == 200


def test_example_config_parses(tmp_path: Path) -> None:
    from llm_ops_helper.controller.gateway.config import parse_config
    example = Path(__file__).resolve().parents[3] / "systemd" / "gateway.example.toml"
    token = tmp_path / "token"
    token.write_text("t\n")
    text = example.read_text().replace("/etc/llmops/gateway-controller.token", str(token))
    config = parse_config(text, str(example))
    assert [k.name for k in config.keys] == ["team-a", "batch"]
    assert config.controller_token == "t"
    assert config.guard_config(config.keys[0]) is not None
