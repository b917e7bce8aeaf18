"""The model routes over real HTTP: streamed uploads, Range downloads, lifecycle, errors."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llm_ops_helper.controller import api as controller_api
from llm_ops_helper.controller.registry import Registry
from llm_ops_helper.controller.registry.api import add_routes, artifact_url
from tests.controller.registry.helpers import CARD, gguf, make_registry, pieces

WHO = {"X-LLMOps-User": "alice"}


class Harness:
    def __init__(self, client: TestClient[web.Request, web.Application], registry: Registry, in_use: set[str],
                 tmp: Path) -> None:
        self.client, self.registry, self.in_use, self.tmp = client, registry, in_use, tmp

    async def upload(self, name: str, data: bytes | AsyncIterator[bytes] | None, status: int = 201,
                     **params: Any) -> dict[str, Any]:
        query: list[tuple[str, str]] = []
        for key, value in params.items():
            for v in value if isinstance(value, list) else [value]:
                query.append((key, str(v)))
        response = await self.client.post(f"/api/v1/models/{name}/versions", params=query,
                                          data=data, headers=WHO)
        body: dict[str, Any] = await response.json()
        assert response.status == status, body
        return body

    async def call(self, method: str, path: str, status: int = 200,
                   **kwargs: Any) -> dict[str, Any]:
        response = await self.client.request(method, path, headers=WHO, **kwargs)
        body: dict[str, Any] = await response.json()
        assert response.status == status, body
        return body

    def nothing_left_behind(self) -> None:
        assert self.registry.models() == []
        assert self.registry.blobs.blobs() == []
        assert list((self.tmp / "blobs" / "tmp").iterdir()) == []


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    in_use: set[str] = set()
    registry = make_registry(tmp_path, in_use)
    app = web.Application(middlewares=[controller_api._errors])
    add_routes(app, registry, public_url=lambda: "http://head:8470/")
    client = TestClient(TestServer(app))
    await client.start_server()
    yield Harness(client, registry, in_use, tmp_path)
    await client.close()
    registry.close()


async def test_streamed_upload_with_checksum_and_version_json(h: Harness) -> None:
    data = b"GGUF" + os.urandom((5 << 20) - 4)
    sha = hashlib.sha256(data).hexdigest()
    # an async generator body goes out chunked, in 32 KiB pieces
    body = await h.upload("tiny", pieces(data, 32768), sha256=sha, parameters="124M",
                          quantization="Q4_K_M", tag=["team=search", "ctx=2048"],
                          description="first cut")
    assert body == {
        "model": "tiny", "version": 1, "ref": "tiny@1", "stage": "registered", "aliases": [],
        "runtime": "llamacpp", "format": "gguf",
        "artifact": {"sha256": sha, "size_bytes": len(data), "filename": "model.gguf"},
        "source_uri": None, "parameters": 124_000_000, "quantization": "Q4_K_M",
        "tags": {"team": "search", "ctx": "2048"}, "description": "first cut",
        "created_by": "alice", "created_at": body["created_at"], "replaces": None,
        "stage_changed_at": body["created_at"]}
    assert h.registry.artifact_path(sha).read_bytes() == data
    response = await h.client.post("/api/v1/models/sim-small/versions", data=CARD)
    assert response.status == 201
    assert response.headers["Location"] == "http://head:8470/api/v1/models/sim-small/versions/1"
    card = await response.json()
    assert (card["format"], card["runtime"], card["created_by"]) == ("sim", "sim", "anonymous")
    remote = await h.upload("big", None, runtime="vllm", source_uri="hf://org/big")
    assert remote["artifact"] is None and remote["source_uri"] == "hf://org/big"


async def test_checksum_mismatch_is_400_and_stores_nothing(h: Harness) -> None:
    data = gguf(3 << 20)
    wrong = hashlib.sha256(b"something else").hexdigest()
    body = await h.upload("tiny", pieces(data), 400, sha256=wrong)
    assert body == {"error": f"checksum mismatch: expected {wrong}, got "
                             f"{hashlib.sha256(data).hexdigest()}", "status": 400}
    h.nothing_left_behind()


async def test_client_gone_mid_upload_leaves_nothing(h: Harness) -> None:
    server = h.client.server
    _, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"POST /api/v1/models/tiny/versions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/octet-stream\r\n"
                 b"Content-Length: 100000000\r\n\r\n" + b"GGUF" + b"\0" * (6 << 20))
    await writer.drain()
    temp = h.tmp / "blobs" / "tmp"
    async with asyncio.timeout(30):
        while not any(temp.iterdir()):  # the upload is being written
            await asyncio.sleep(0.01)
    writer.transport.abort()  # gone, without the other 94 MB
    async with asyncio.timeout(30):
        while any(temp.iterdir()):
            await asyncio.sleep(0.01)
    h.nothing_left_behind()
    # and the server still takes the next upload
    assert (await h.upload("tiny", gguf()))["version"] == 1


async def test_range_downloads_resume_and_etag(h: Harness) -> None:
    data = os.urandom(3 << 20)
    sha = (await h.upload("tiny", data, runtime="vllm", filename="model.safetensors")
           )["artifact"]["sha256"]
    url = f"/api/v1/artifacts/{sha}"
    assert artifact_url("http://head:8470/", sha) == f"http://head:8470{url}"
    full = await h.client.get(url)
    assert full.status == 200 and await full.read() == data
    assert full.headers["ETag"] == f'"{sha}"'
    assert full.headers["Content-Length"] == str(len(data))
    assert full.headers["Accept-Ranges"] == "bytes"
    part = await h.client.get(url, headers={"Range": "bytes=1000-1999"})
    assert part.status == 206 and await part.read() == data[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    assert part.headers["ETag"] == f'"{sha}"'
    offset = 2_000_000  # a download cut here resumes from the offset
    rest = await h.client.get(url, headers={"Range": f"bytes={offset}-",
                                            "If-Range": f'"{sha}"'})
    assert rest.status == 206 and rest.headers["Content-Length"] == str(len(data) - offset)
    assert data[:offset] + await rest.read() == data
    past = await h.client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert past.status == 416
    cached = await h.client.get(url, headers={"If-None-Match": f'"{sha}"'})
    assert cached.status == 304 and cached.headers["ETag"] == f'"{sha}"'
    head = await h.client.head(url)
    assert head.status == 200 and head.headers["Content-Length"] == str(len(data))
    await h.call("GET", f"/api/v1/artifacts/{'0' * 64}", 404)
    bad = await h.call("GET", "/api/v1/artifacts/nothex", 400)
    assert bad["error"] == "sha256 'nothex': expected 64 lowercase hex digits"


async def test_models_model_version_and_lineage_routes(h: Harness) -> None:
    for _ in range(3):
        await h.upload("tiny", gguf())
    await h.call("POST", "/api/v1/models/tiny/versions/2/stage", json={"stage": "staging"})
    await h.call("POST", "/api/v1/models/tiny/versions/3/stage", json={"stage": "staging"})
    await h.call("POST", "/api/v1/models/tiny/versions/2/stage", json={"stage": "production"})
    three = await h.call("POST", "/api/v1/models/tiny/versions/3/stage",
                         json={"stage": "production"})
    assert (three["stage"], three["replaces"], three["aliases"]) == ("production", 2,
                                                                     ["production"])
    models = await h.call("GET", "/api/v1/models")
    (tiny,) = models["models"]
    assert (tiny["name"], tiny["latest"], tiny["versions"], tiny["aliases"]) == (
        "tiny", 3, 3, {"production": 3})
    model = await h.call("GET", "/api/v1/models/tiny")
    assert [(v["version"], v["stage"]) for v in model["versions"]] == [
        (1, "registered"), (2, "archived"), (3, "production")]
    assert (await h.call("GET", "/api/v1/models/tiny/versions/production"))["version"] == 3
    assert (await h.call("GET", "/api/v1/models/tiny/versions/2"))["stage"] == "archived"
    events = (await h.call("GET", "/api/v1/models/tiny/lineage"))["events"]
    replaced = [e for e in events if e["action"] == "replaced"]
    assert replaced == [{"ts": replaced[0]["ts"], "by": "alice", "action": "replaced",
                         "version": 3, "detail": "tiny@3 replaced tiny@2"}]
    await h.call("GET", "/api/v1/models/nope", 404)
    missing = await h.call("GET", "/api/v1/models/tiny/versions/9", 404)
    assert missing["error"] == "tiny has no version 9 (latest is 3)"


async def test_stage_errors_and_in_use(h: Harness) -> None:
    await h.upload("tiny", gguf())
    illegal = await h.call("POST", "/api/v1/models/tiny/versions/1/stage", 409,
                           json={"stage": "production"})
    assert illegal["error"] == ("tiny@1: cannot move from 'registered' to 'production': from "
                                "'registered' a version can move to: staging, archived, retired")
    bad = await h.call("POST", "/api/v1/models/tiny/versions/1/stage", 400,
                       json={"stage": 3})
    assert "$.stage" in bad["error"]
    await h.call("POST", "/api/v1/models/tiny/versions/1/stage", 400, data=b"{oops")
    await h.call("POST", "/api/v1/models/tiny/versions/x/stage", 400, json={"stage": "staging"})
    for odd in ("%D9%A1", "%C2%B2", "9" * 30):  # an Arabic-Indic 1, a superscript 2, too long
        await h.call("POST", f"/api/v1/models/tiny/versions/{odd}/stage", 400,
                     json={"stage": "staging"})
    h.in_use.add("tiny@1")
    busy = await h.call("POST", "/api/v1/models/tiny/versions/1/stage", 409,
                        json={"stage": "retired"})
    assert busy["error"].startswith("tiny@1 is used by a deployment")
    h.in_use.clear()
    sha = h.registry.resolve("tiny").artifact.sha256  # type: ignore[union-attr]
    await h.call("POST", "/api/v1/models/tiny/versions/1/stage", json={"stage": "retired"})
    await h.call("GET", f"/api/v1/artifacts/{sha}", 404)


async def test_alias_routes_and_diff(h: Harness) -> None:
    await h.upload("tiny", gguf(), quantization="Q4_K_M")
    await h.upload("tiny", gguf(5000), quantization="Q8_0")
    put = await h.call("PUT", "/api/v1/models/tiny/aliases/canary", json={"version": 1})
    assert put == {"alias": "canary", "version": 1, "previous": None}
    moved = await h.call("PUT", "/api/v1/models/tiny/aliases/canary", json={"version": 2})
    assert moved == {"alias": "canary", "version": 2, "previous": 1}
    number = await h.call("PUT", "/api/v1/models/tiny/aliases/7", 400, json={"version": 2})
    assert "may not be a number" in number["error"]
    await h.call("PUT", "/api/v1/models/tiny/aliases/production", 409, json={"version": 2})
    diff = await h.call("GET", "/api/v1/models/tiny/diff?from=1&to=canary")
    assert diff["from"]["version"] == 1 and diff["to"]["version"] == 2
    assert diff["changes"] == {"quantization": ["Q4_K_M", "Q8_0"],
                               "aliases": [[], ["canary"]]}
    assert diff["artifact"] == {"same": False, "size_delta_bytes": 904}
    await h.call("GET", "/api/v1/models/tiny/diff?from=1", 400)
    assert await h.call("DELETE", "/api/v1/models/tiny/aliases/canary") == {
        "alias": "canary", "previous": 2}
    await h.call("DELETE", "/api/v1/models/tiny/aliases/canary", 404)


async def test_bad_uploads_are_refused_before_storing(h: Harness) -> None:
    runtime = await h.upload("tiny", gguf(), 400, runtime="tgi")
    assert runtime["error"] == ("unknown runtime 'tgi': expected one of llamacpp, vllm, "
                                "sglang, sim, command")
    name = await h.upload("Bad_Name", gguf(), 400)
    assert "model 'Bad_Name'" in name["error"]
    typo = await h.upload("tiny", gguf(), 400, runtim="sim")
    assert typo["error"].startswith("unknown parameter 'runtim'")
    empty = await h.upload("tiny", b"", 400)
    assert empty["error"].startswith("empty body and no source_uri")
    await h.upload("tiny", gguf(), 400, tag="novalue")
    await h.upload("tiny", gguf(), 400, parameters="lots")
    await h.upload("tiny", b"\0" * 1000, 400, filename="x.safetensors")
    h.nothing_left_behind()
    unknown = await h.call("GET", "/api/v1/models/tiny/nothing", 404)
    assert unknown["error"] == "no such path: /api/v1/models/tiny/nothing"


async def test_size_limit(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "c.db", tmp_path / "blobs", max_artifact_bytes=10_000)
    app = web.Application()
    add_routes(app, registry, public_url=lambda: "http://head")
    async with TestClient(TestServer(app)) as client:
        declared = await client.post("/api/v1/models/tiny/versions", data=gguf(20_000))
        assert declared.status == 413 and "over the limit of 10000" in (await declared.json()
                                                                        )["error"]
        streamed = await client.post("/api/v1/models/tiny/versions",
                                     data=pieces(gguf(20_000), 4096))
        assert streamed.status == 413
        assert (await streamed.json())["error"] == "upload larger than the limit of 10000 bytes"
    assert registry.models() == [] and list((tmp_path / "blobs" / "tmp").iterdir()) == []
    registry.close()
