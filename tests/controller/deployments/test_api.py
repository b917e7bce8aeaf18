"""The deployment routes over real HTTP, on the engine with a real registry and fleet."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llm_ops_helper.controller.deployments.api import add_routes

from .world import World

BASE = "/api/v1/deployments"
NO_CANARY = {"observe_s": 0}


@pytest.fixture
async def client(world: World) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    app = web.Application()
    add_routes(app, world.engine)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_put_get_list_scale_endpoints_history(client: TestClient, world: World) -> None:  # type: ignore[type-arg]
    r = await client.put(f"{BASE}/chat", json={"model": "tiny@1", "replicas": 2,
                                              "rollback": NO_CANARY},
                         headers={"X-LLMOps-User": "alice"})
    assert r.status == 201, await r.text()
    body = await r.json()
    assert body["name"] == "chat" and body["version"] == "tiny@1" and body["revision"] == 1
    assert body["phase"] == "progressing" and body["desired"] == 2
    world.deliver(world.step())
    world.ready_all()
    world.step()
    r = await client.get(f"{BASE}/chat")
    body = await r.json()
    assert body["phase"] == "available" and body["ready"] == 2
    assert {x["state"] for x in body["replicas"]} == {"ready"}
    r = await client.get(f"{BASE}/chat/endpoints")
    endpoints = (await r.json())["endpoints"]
    assert sorted(e["host"] for e in endpoints) == ["host-a", "host-b"]
    assert all(e["url"].startswith("http://host-") and e["version"] == "tiny@1"
               for e in endpoints)
    r = await client.put(f"{BASE}/chat", json={"model": "tiny@2", "replicas": 2,
                                              "rollback": NO_CANARY})
    assert r.status == 200 and (await r.json())["revision"] == 2
    r = await client.post(f"{BASE}/chat/scale", json={"replicas": 3})
    assert r.status == 200 and (await r.json())["desired"] == 3
    r = await client.get(BASE)
    assert [d["name"] for d in (await r.json())["deployments"]] == ["chat"]
    r = await client.get(f"{BASE}/chat/history")
    history = await r.json()
    assert [x["version"] for x in history["revisions"]] == ["tiny@1", "tiny@2"]
    assert history["revisions"][0]["by"] == "alice"
    assert {"deployment_applied", "replica_placed", "rollout_started",
            "deployment_scaled"} <= {e["kind"] for e in history["events"]}
    r = await client.post(f"{BASE}/chat/rollback", json={})
    assert r.status == 200 and (await r.json())["version"] == "tiny@1"
    r = await client.delete(f"{BASE}/chat")
    assert r.status == 202 and (await r.json())["phase"] == "deleting"


@pytest.mark.parametrize(("method", "path", "json", "status", "message"), [
    ("put", "/chat", {"model": "tiny@9"}, 404, "tiny"),
    ("put", "/chat", {"model": "tiny@1", "replicas": -1}, 400,
     "spec field 'replicas': expected int >= 0"),
    ("put", "/chat", {"model": "tiny@1", "runtime": "tgi"}, 400, "unknown runtime 'tgi'"),
    ("put", "/chat", {"model": "tiny@1", "gpu_memory_bytes": 1 << 50}, 400,
     "deployment chat cannot run anywhere: no online host with runtime sim has a GPU of"),
    ("put", "/Chat", {"model": "tiny@1"}, 400, "deployment name 'Chat'"),
    ("get", "/nope", None, 404, "no deployment named 'nope'"),
    ("post", "/nope/scale", {"replicas": 1}, 404, "no deployment named 'nope'"),
    ("get", "/nope/endpoints", None, 404, "no deployment named 'nope'"),
    ("get", "/nope/history", None, 404, "no deployment named 'nope'"),
    ("delete", "/nope", None, 404, "no deployment named 'nope'"),
])
async def test_errors_are_json_naming_the_cause(client: TestClient, method: str, path: str,  # type: ignore[type-arg]
                                                json: object, status: int,
                                                message: str) -> None:
    r = await getattr(client, method)(BASE + path, json=json)
    assert r.status == status
    body = await r.json()
    assert body["status"] == status and message in body["error"], body


async def test_bad_scale_and_rollback_bodies(client: TestClient) -> None:  # type: ignore[type-arg]
    await client.put(f"{BASE}/chat", json={"model": "tiny@1"})
    r = await client.post(f"{BASE}/chat/scale", json={"replicas": "two"})
    assert r.status == 400 and "scale body" in (await r.json())["error"]
    r = await client.post(f"{BASE}/chat/scale", json={"replicas": 5, "max_replicas": 4})
    assert r.status == 400
    r = await client.post(f"{BASE}/chat/rollback", json={})
    assert r.status == 409 and "no version before tiny@1" in (await r.json())["error"]
    r = await client.get(f"{BASE}/chat/history?limit=x")
    assert r.status == 400 and "parameter 'limit'" in (await r.json())["error"]
    for odd in ("\u0661\u0662", "\u00b2", "9" * 400):  # Arabic-Indic, superscript, huge
        r = await client.get(f"{BASE}/chat/history", params={"limit": odd})
        assert r.status == 400 and "parameter 'limit'" in (await r.json())["error"]


async def test_the_user_header_is_kept_short_and_printable(client: TestClient,  # type: ignore[type-arg]
                                                           world: World) -> None:
    r = await client.put(f"{BASE}/chat", json={"model": "tiny@1", "rollback": NO_CANARY},
                         headers={"X-LLMOps-User": "m\xadallory" + "x" * 500})
    assert r.status == 201
    by = world.engine.get("chat")["created_by"]
    assert by == ("mallory" + "x" * 500)[:199]
