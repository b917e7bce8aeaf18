"""The OpenAPI document: every route build_app registers is described, the document has the
shape of OpenAPI 3.1, and a real controller app serves it without a token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llm_ops_helper.controller import auth, openapi
from llm_ops_helper.controller.api import STATE, build_app
from llm_ops_helper.controller.config import parse
from llm_ops_helper.controller.state import ControllerState, build_state

METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def state_for(tmp_path: Path) -> ControllerState:
    return build_state(parse(f'[broker]\nhost = "x"\n[state]\ndir = "{tmp_path}"\n',
                             str(tmp_path / "c.toml")))


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], web.Application]]:
    state = state_for(tmp_path)
    app = build_app(state)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, app
    finally:
        await client.close()
        state.store.close()
        state.tokens.close()


async def test_every_api_route_of_the_real_app_is_described(served: Any) -> None:
    _client, app = served
    routes = openapi.served_routes(app)
    patterns = {p for _m, p in routes}
    # The routes the issue promises are among them, so the test cannot pass on an empty router.
    for expected in ("/healthz", "/metrics", "/api/v1/hosts", "/api/v1/overview",
                     "/api/v1/stream", "/api/v1/deployments/{name}", openapi.PATH):
        assert expected in patterns
    assert openapi.undocumented(app) == [], (
        "routes without an entry in controller/openapi.py OPERATIONS")


async def test_no_entry_describes_a_route_that_is_not_served(served: Any) -> None:
    _client, app = served
    assert set(openapi.OPERATIONS) - set(openapi.served_routes(app)) == set()


async def test_served_without_a_token_as_openapi_3_1(served: Any) -> None:
    client, app = served
    async with client.get(openapi.PATH) as response:  # no Authorization header
        assert response.status == 200
        doc = await response.json()
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"] and doc["info"]["version"]
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert doc["security"] == [{"bearer": []}]
    schemas = doc["components"]["schemas"]
    for pattern, item in doc["paths"].items():
        assert pattern.startswith("/")
        params_in_path = {seg[1:-1] for seg in pattern.split("/") if seg.startswith("{")}
        for method, op in item.items():
            assert method in METHODS
            assert op["summary"] and op["responses"], (method, pattern)
            role = auth.required_role(method.upper(), pattern)
            assert op["x-llmops-role"] == role
            assert (op.get("security") == []) == (role is None), (method, pattern)
            declared = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert declared == params_in_path, (method, pattern)
            for p in op["parameters"]:
                assert p["in"] in {"path", "query", "header"} and "schema" in p
            for status in op["responses"]:
                assert status.isdigit() and len(status) == 3
    # Every $ref resolves inside the document.
    refs: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(doc)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas
    # The document matches the roles the middleware enforces.
    deploy = doc["paths"]["/api/v1/deployments/{name}"]["put"]
    assert deploy["x-llmops-role"] == "operator"
    assert deploy["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DeploymentSpec"}
    assert "model" in schemas["DeploymentSpec"]["properties"]
    assert doc["paths"]["/api/v1/audit"]["get"]["x-llmops-role"] == "admin"
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert doc["paths"] == openapi.document(app)["paths"]


async def test_a_body_is_optional_only_where_the_route_takes_none(served: Any) -> None:
    client, app = served
    paths = openapi.document(app)["paths"]
    optional = {(m, p) for p, item in paths.items() for m, op in item.items()
                if "requestBody" in op and not op["requestBody"]["required"]}
    assert optional == {("post", "/api/v1/models/{name}/versions"),
                        ("post", "/api/v1/deployments/{name}/rollback")}
    # The upload without a body, as the document allows: a reference to a model elsewhere.
    token = app[STATE].tokens.create("op", "operator", by="test")
    async with client.post("/api/v1/models/ref-only/versions",
                           params={"source_uri": "hf://org/model", "runtime": "vllm"},
                           headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 201, await response.text()


def test_a_new_route_without_a_description_is_reported() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    fresh = web.Application()
    fresh.router.add_get("/api/v1/hosts", handler)
    fresh.router.add_post("/api/v1/brand-new", handler)
    assert openapi.undocumented(fresh) == [("POST", "/api/v1/brand-new")]
    doc = openapi.document(fresh)
    assert doc["paths"]["/api/v1/brand-new"]["post"]["summary"] == "(not yet documented)"
