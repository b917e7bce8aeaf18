"""The dashboard's routes over real HTTP on a real controller app (SQLite, registry, engine):
``/api/v1/overview``, the ``/api/v1/stream`` events and the page's static files."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from llm_ops_helper.controller.api import build_app
from llm_ops_helper.controller.config import parse
from llm_ops_helper.controller.dashboard.overview import gpu_health, overview, version_number
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


def bearer(state: ControllerState, role: str = "viewer") -> dict[str, str]:
    token = state.tokens.create(f"test-{role}", role, "test")  # type: ignore[arg-type]
    return {"Authorization": f"Bearer {token}"}


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

    rules = [(a["rule"], a["severity"], a["host"], a["gpu"]) for a in body["alerts"]]
    assert rules[0] == ("gpu_ecc_uncorrected", "critical", "gpu-1", 2)
    assert ("gpu_temperature_high", "warning", "gpu-1", 1) in rules
    assert all({"id", "replica", "summary", "started_at"} <= a.keys() for a in body["alerts"])
    # The route serves the pure function's answer.
    assert overview(state, now=body["ts"]) | {"ts": 0} == body | {"ts": 0}


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


async def test_page_and_static_files_are_open_with_types_and_no_cache(api: Client) -> None:
    r = await api.get("/")
    assert r.status == 200 and r.content_type == "text/html"
    assert r.headers["Cache-Control"] == "no-cache"
    page = await r.text()
    assert '<script src="/ui/app.js"' in page and 'href="/ui/style.css"' in page
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"),
                       ("index.html", "text/html")):
        r = await api.get(f"/ui/{name}")
        assert (r.status, r.content_type) == (200, kind), name
        assert r.headers["Cache-Control"] == "no-cache"
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]


@pytest.mark.parametrize("path", [
    "/ui/nope.js", "/ui/..%2Foverview.py", "/ui/%2e%2e%2fstream.py", "/ui/.hidden.css",
    "/ui/overview.py", "/ui/static", "/ui/app.js%00.css", "/ui/x%2F..%2F..%2Fapi.py",
])
async def test_only_files_of_the_static_folder_are_served(api: Client, state: ControllerState,
                                                         path: str) -> None:
    # With a token: a path that no route matches is a 404 too, not a 401.
    r = await api.get(path, headers=bearer(state))
    assert r.status == 404, (path, r.status, await r.text())
