"""GET /api/v1/deployments/{name}/decisions over real HTTP, with the deployment routes beside
it: a spec with an autoscale section goes in through PUT, its decisions come out newest first."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llm_ops_helper.controller.autoscale import api
from llm_ops_helper.controller.deployments import api as deployments_api

from .conftest import Scene

BASE = "/api/v1/deployments"


@pytest.fixture
async def client(scene: Scene) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    app = web.Application()
    deployments_api.add_routes(app, scene.world.engine)
    api.add_routes(app, scene.autoscaler)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_decisions_newest_first_with_a_limit(client: TestClient,  # type: ignore[type-arg]
                                                   scene: Scene) -> None:
    r = await client.put(f"{BASE}/chat", json={
        "model": "tiny@1", "replicas": 1, "max_replicas": 3, "rollback": {"observe_s": 0},
        "autoscale": {"mode": "advisory", "capacity_tokens_per_s": 100}})
    assert r.status == 201, await r.text()
    scene.settle()
    for _ in range(3):
        scene.load(30.0)
        scene.tick()
    r = await client.get(f"{BASE}/chat/decisions")
    body = await r.json()
    assert r.status == 200 and body["mode"] == "advisory" and body["count"] == 3
    ts = [d["ts"] for d in body["decisions"]]
    assert ts == sorted(ts, reverse=True)
    assert body["decisions"][-1]["rule"] == "no_metrics"
    assert body["decisions"][0]["capacity"]["tokens_per_s"] == 100
    r = await client.get(f"{BASE}/chat/decisions?limit=1")
    assert (await r.json())["count"] == 1


async def test_a_bad_autoscale_spec_is_refused_naming_the_field(
        client: TestClient) -> None:  # type: ignore[type-arg]
    r = await client.put(f"{BASE}/chat", json={"model": "tiny@1",
                                               "autoscale": {"mode": "sometimes"}})
    assert r.status == 400
    assert (await r.json())["error"] == ("spec field 'autoscale.mode': 'sometimes' is not one "
                                         "of 'off', 'advisory', 'on'")
    r = await client.put(f"{BASE}/chat", json={"model": "tiny@1",
                                               "autoscale": {"mode": "on"}})
    assert r.status == 400 and "needs a maximum" in (await r.json())["error"]


@pytest.mark.parametrize(("path", "status", "error"), [
    (f"{BASE}/nope/decisions", 404, "no deployment named 'nope'"),
    (f"{BASE}/chat/decisions?limit=0", 400, "parameter 'limit': expected an integer 1..10000"),
    (f"{BASE}/chat/decisions?limit=x", 400, "parameter 'limit'"),
])
async def test_errors_are_json_naming_the_cause(client: TestClient,  # type: ignore[type-arg]
                                                path: str, status: int, error: str) -> None:
    r = await client.get(path)
    assert r.status == status
    body = await r.json()
    assert body["status"] == status and body["error"].startswith(error)
