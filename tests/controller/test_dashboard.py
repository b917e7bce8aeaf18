"""The dashboard's routes over real HTTP on a real controller app (SQLite, registry, engine):
``/api/v1/overview``, the ``/api/v1/stream`` events and the page's static files."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from llm_ops_helper.controller.api import build_app
from llm_ops_helper.controller.config import parse
from llm_ops_helper.controller.dashboard.overview import (
    OverviewCache,
    gpu_health,
    overview,
    version_number,
)
from llm_ops_helper.controller.dashboard.stream import AUTH_RECHECK_EVERY, FEED, open_streams
from llm_ops_helper.controller.registry.records import NewVersion
from llm_ops_helper.controller.state import ControllerState, build_state
from llm_ops_helper.proto.codec import encode
from llm_ops_helper.proto.messages import GpuInfo, Status
from tests.controller.fixtures import GIB, gpu, telemetry

Client = TestClient[web.Request, web.Application]
NOW = time.time() - 5.0


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[ControllerState]:
    built = build_state(parse(f'[broker]\nhost = "x"\n[state]\ndir = "{tmp_path}"\n'
                              '[detection]\nenabled = false\n', "c.toml"))
    yield built
    for close in (built.store.close, built.registry.close, built.deployments.store.close,
                  built.autoscaler.store.close, built.tokens.close):
        close()


@pytest.fixture
async def api(state: ControllerState) -> AsyncIterator[Client]:
    client: Client = TestClient(TestServer(build_app(state)))
    await client.start_server()
    yield client
    await client.close()


def bearer(state: ControllerState, role: str = "viewer", name: str = "") -> dict[str, str]:
    token = state.tokens.create(name or f"test-{role}", role, "test")  # type: ignore[arg-type]
    return {"Authorization": f"Bearer {token}"}


async def until(check: Any, what: str, timeout_s: float = 30.0) -> None:
    """Until ``check()`` is true; the limit only guards a hang."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"still not {what} after {timeout_s} s"
        await asyncio.sleep(0.05)


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def a_fleet(state: ControllerState) -> None:
    """gpu-1 online with three GPUs (fine, hot, uncorrected ECC), gpu-2 known by its retained
    status only, gpu-3 gone offline; a model to deploy."""
    inventory = [GpuInfo(index=i, uuid=f"GPU-{i}", name="NVIDIA A100",
                         memory_total_bytes=80 * GIB) for i in range(3)]
    state.ingest.handle("llmops/v1/agents/gpu-1/status", encode(Status(
        host="gpu-1", state="online", ts=NOW, run_id="run1", interval_s=1.0,
        agent_version="0.1.0", gpus=inventory, runtimes=["sim"])))
    state.ingest.handle("llmops/v1/agents/gpu-1/telemetry", encode(telemetry(
        host="gpu-1", ts=NOW, gpus=[gpu(0, memory_used_bytes=0), gpu(1, temperature_c=95.0),
                                    gpu(2, ecc_uncorrected_total=1)])))
    state.ingest.handle("llmops/v1/agents/gpu-2/status", encode(Status(
        host="gpu-2", state="online", ts=NOW, run_id="run1", gpus=inventory[:1])))
    state.ingest.handle("llmops/v1/agents/gpu-3/status", encode(Status(
        host="gpu-3", state="online", ts=NOW, run_id="run1", gpus=inventory[:1])))
    state.ingest.handle("llmops/v1/agents/gpu-3/status", encode(Status(
        host="gpu-3", state="offline", ts=NOW, reason="shutdown")))
    state.alerts.commit()
    await state.registry.register("tiny", NewVersion(runtime="sim", filename="tiny.toml"),
                                  _chunks(b"[sim]\nttft_ms = 20.0\n"))


async def test_overview_carries_hosts_gpus_health_deployments_and_alerts(
        api: Client, state: ControllerState) -> None:
    await a_fleet(state)
    headers = bearer(state, "operator")
    r = await api.put("/api/v1/deployments/chat", json={"model": "tiny@1", "runtime": "sim"},
                      headers=headers)
    assert r.status == 201, await r.text()

    r = await api.get("/api/v1/overview", headers=bearer(state))
    assert r.status == 200, await r.text()
    body = await r.json()
    assert {"ts", "hosts", "deployments", "alerts"} <= body.keys()
    one, two, three = body["hosts"]
    assert (one["host"], one["online"], one["offline_reason"]) == ("gpu-1", True, None)
    assert (two["host"], two["online"], two["offline_reason"]) == ("gpu-2", True, None)
    assert (three["host"], three["online"], three["offline_reason"]) == (
        "gpu-3", False, "shutdown")
    assert one["last_ts"] == NOW and one["agent_version"] == "0.1.0"
    assert one["cpu_pct"] == 20.0 and one["memory_used_pct"] == pytest.approx(37.5)
    assert one["alerts"] == 2 and two["alerts"] == 0
    assert [(g["index"], g["health"]) for g in one["gpus"]] == [
        (0, "ok"), (1, "warning"), (2, "critical")]
    g0 = one["gpus"][0]
    assert g0 | {"uuid": None} == g0 | {
        "name": "NVIDIA A100", "uuid": None, "healthy": True, "util_pct": 50.0,
        "memory_used_bytes": 0, "memory_total_bytes": 80 * GIB, "temperature_c": 60.0,
        "power_w": 250.0}
    # No telemetry: the inventory, with no readings.
    assert [(g["index"], g["util_pct"], g["memory_total_bytes"], g["health"])
            for g in two["gpus"]] == [(0, None, 80 * GIB, "ok")]
    assert two["last_ts"] is None and two["cpu_pct"] is None

    (chat,) = body["deployments"]
    assert {k: chat[k] for k in ("name", "model", "version", "runtime", "replicas_desired",
                                 "autoscale_mode")} == {
        "name": "chat", "model": "tiny", "version": 1, "runtime": "sim",
        "replicas_desired": 1, "autoscale_mode": "off"}
    assert chat["replicas_ready"] == 0 and chat["phase"] == "progressing"
    (replica,) = chat["replicas"]
    assert replica["host"] == "gpu-1" and replica["version"] == 1 and replica["url"] is None
    assert replica["state"] == "pending" and len(replica["gpus"]) == 1
    assert {"name", "reason"} <= replica.keys()
    assert chat["previous_ref"] is None and chat["previous_version"] is None  # nothing before

    rules = [(a["rule"], a["severity"], a["host"], a["gpu"]) for a in body["alerts"]]
    assert rules[0] == ("gpu_ecc_uncorrected", "critical", "gpu-1", 2)
    assert ("gpu_temperature_high", "warning", "gpu-1", 1) in rules
    assert all({"id", "replica", "summary", "started_at"} <= a.keys() for a in body["alerts"])
    # The route serves the pure function's answer.
    assert overview(state, now=body["ts"]) | {"ts": 0} == body | {"ts": 0}


async def test_overview_names_the_rollback_target_in_full(api: Client,
                                                         state: ControllerState) -> None:
    """previous_ref keeps the model's name: the version before may be of another model."""
    await a_fleet(state)
    await state.registry.register("other", NewVersion(runtime="sim", filename="o.toml"),
                                  _chunks(b"[sim]\nttft_ms = 30.0\n"))
    headers = bearer(state, "operator")
    for ref in ("tiny@1", "other@1"):
        r = await api.put("/api/v1/deployments/chat", json={"model": ref, "runtime": "sim"},
                          headers=headers)
        assert r.status in (200, 201), await r.text()
    (chat,) = overview(state)["deployments"]
    assert (chat["model"], chat["version"]) == ("other", 1)
    assert (chat["previous_ref"], chat["previous_version"]) == ("tiny@1", 1)


def test_gpu_health_folds_alerts_and_the_healthy_flag() -> None:
    assert gpu_health(True, []) == "ok"
    assert gpu_health(True, ["info"]) == "ok"
    assert gpu_health(True, ["warning", "info"]) == "warning"
    assert gpu_health(True, ["warning", "critical"]) == "critical"
    assert gpu_health(False, []) == "critical"
    assert [version_number(x) for x in ("chat@3", "chat@prod", None, "")] == [3, None, None,
                                                                             None]


async def test_overview_and_stream_need_a_token(api: Client, state: ControllerState) -> None:
    for path in ("/api/v1/overview", "/api/v1/stream"):
        r = await api.get(path)
        assert r.status == 401 and "no token" in (await r.json())["error"]
        r = await api.get(path, headers={"Authorization": "Bearer llmops_nope"})
        assert r.status == 401


async def next_event(r: ClientResponse) -> tuple[list[str], str, dict[str, Any]]:
    """The comments, the name and the JSON data of the next event."""
    comments: list[str] = []
    name, data = "", ""
    while True:
        line = (await r.content.readline()).decode()
        assert line, "the stream ended"
        line = line.rstrip("\n")
        if line == "":
            if data:
                return comments, name, json.loads(data)
            continue
        if line.startswith(":"):
            comments.append(line[1:].strip())
        elif line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data += line[len("data: "):]


async def test_stream_sends_the_overview_every_second_and_ends_on_shutdown(
        api: Client, state: ControllerState) -> None:
    await a_fleet(state)
    r = await api.get("/api/v1/stream", headers=bearer(state))
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["Cache-Control"] == "no-cache"
    comments, name, first = await next_event(r)
    assert comments == ["keep-alive"] and name == "overview"
    assert [h["host"] for h in first["hosts"]] == ["gpu-1", "gpu-2", "gpu-3"]
    _, name, second = await next_event(r)
    assert name == "overview" and second["ts"] > first["ts"]

    # The controller stops: the open stream ends (rather than holding the shutdown).
    await api.app.shutdown()
    rest = await asyncio.wait_for(r.content.read(), timeout=30)
    assert rest.count(b"event: overview") <= 1
    assert r.content.at_eof()


async def test_streams_share_one_feed_and_leave_when_their_client_goes(
        api: Client, state: ControllerState) -> None:
    await a_fleet(state)
    headers = bearer(state)
    first = await api.get("/api/v1/stream", headers=headers)
    _, _, a1 = await next_event(first)
    second = await api.get("/api/v1/stream", headers=headers)
    _, _, b1 = await next_event(second)
    assert open_streams(api.app) == 2
    # One overview a tick for both: the first stream carries the very one the second began with.
    seen = [a1["ts"]]
    while seen[-1] < b1["ts"]:
        seen.append((await next_event(first))[2]["ts"])
    assert b1["ts"] in seen
    # A client that goes away: its handler ends at its next event.
    second.close()
    await until(lambda: open_streams(api.app) == 1, "one stream left")
    first.close()
    await until(lambda: open_streams(api.app) == 0, "no stream left")
    # With no stream open, nothing computes the overview.
    feed = api.app[FEED]
    await until(lambda: feed.task is not None and feed.task.done(), "the feed stopped")


async def test_a_revoked_token_loses_its_stream(api: Client, state: ControllerState) -> None:
    await a_fleet(state)
    headers = bearer(state, name="tab")
    r = await api.get("/api/v1/stream", headers=headers)
    await next_event(r)
    assert state.tokens.revoke("tab")
    rest = await asyncio.wait_for(r.content.read(), timeout=60)  # the limit guards a hang
    assert r.content.at_eof() and rest.count(b"event: overview") <= AUTH_RECHECK_EVERY
    await until(lambda: open_streams(api.app) == 0, "the stream gone")
    # The page reconnects, is refused, and signs out.
    again = await api.get("/api/v1/stream", headers=headers)
    assert again.status == 401 and "revoked" in (await again.json())["error"]


async def test_a_client_that_stops_reading_does_not_hold_the_shutdown(
        state: ControllerState) -> None:
    """A stream whose client reads nothing fills the socket, then aiohttp's buffer: its handler
    waits in write(). Stopping the controller aborts that connection rather than waiting for it
    (aiohttp would wait its 60 s shutdown_timeout)."""
    gpus = [gpu(i) for i in range(8)]
    for n in range(400):  # an overview of about a megabyte: the buffers fill in a few events
        host = f"host-{n:03d}"
        state.ingest.handle(f"llmops/v1/agents/{host}/telemetry",
                            encode(telemetry(host=host, ts=NOW, gpus=gpus)))
    app = build_app(state)
    runner = web.AppRunner(app, access_log=None)  # the daemon's runner, its default timeout
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    token = bearer(state)["Authorization"]
    stuck = socket.socket()
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", port))
        stuck.sendall(f"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: {token}"
                      "\r\n\r\n".encode())
        feed = app[FEED]
        await until(lambda: any(s.request.transport is not None
                                and s.request.transport.get_write_buffer_size() > 0
                                for s in feed.streams), "the stream backed up", 60)
        await asyncio.wait_for(runner.cleanup(), 30)  # the limit guards a hang
        assert open_streams(app) == 0
    finally:
        stuck.close()
        await runner.cleanup()


async def test_page_and_static_files_are_open_with_types_and_no_cache(api: Client) -> None:
    r = await api.get("/")
    assert r.status == 200 and r.content_type == "text/html"
    assert r.headers["Cache-Control"] == "no-cache"
    page = await r.text()
    scripts = ['<script src="/ui/format.js"', '<script src="/ui/chart.js"',
               '<script src="/ui/app.js"']
    assert all(s in page for s in scripts) and 'href="/ui/style.css"' in page
    assert [page.index(s) for s in scripts] == sorted(page.index(s) for s in scripts)
    for name, kind in (("app.js", "text/javascript"), ("chart.js", "text/javascript"),
                       ("format.js", "text/javascript"), ("style.css", "text/css"),
                       ("index.html", "text/html")):
        r = await api.get(f"/ui/{name}")
        assert (r.status, r.content_type) == (200, kind), name
        assert r.headers["Cache-Control"] == "no-cache"
        policy = r.headers["Content-Security-Policy"]
        for directive in ("default-src 'self'", "object-src 'none'", "base-uri 'none'",
                          "form-action 'none'", "frame-ancestors 'none'"):
            assert directive in policy, (directive, policy)


@pytest.mark.parametrize("path", [
    "/ui/nope.js", "/ui/..%2Foverview.py", "/ui/%2e%2e%2fstream.py", "/ui/.hidden.css",
    "/ui/overview.py", "/ui/static", "/ui/app.js%00.css", "/ui/x%2F..%2F..%2Fapi.py",
])
async def test_only_files_of_the_static_folder_are_served(api: Client, state: ControllerState,
                                                         path: str) -> None:
    # With a token: a path that no route matches is a 404 too, not a 401.
    r = await api.get(path, headers=bearer(state))
    assert r.status == 404, (path, r.status, await r.text())


async def test_the_overview_is_built_at_most_once_a_second_however_many_ask(
        state: ControllerState) -> None:
    """At 2,000 hosts the overview is 5 MB: GETs within a second share one build; a GET that
    finds it a second old gets it as it is and the rebuild runs right after, off its path; one
    that finds it older than max_stale_s (nobody asked for a while) waits for a fresh one."""
    t = [0.0]
    cache = OverviewCache(state, max_age_s=1.0, max_stale_s=5.0, clock=lambda: t[0])
    first = cache.json()
    t[0] = 0.9
    assert cache.json() is first
    t[0] = 1.0
    assert cache.json() is first and cache.json() is first  # one rebuild scheduled
    await asyncio.sleep(0)
    rebuilt = cache.json()
    assert rebuilt is not first and json.loads(rebuilt)["ts"] >= json.loads(first)["ts"]
    t[0] = 7.0
    assert cache.json() is not rebuilt  # too old to serve: built before answering
    assert cache.refresh() is not rebuilt  # the live stream's feed rebuilds every tick
