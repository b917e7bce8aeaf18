"""API tokens, roles and the audit log over real HTTP, with the controller's real SQLite file."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from llm_ops_helper import cli
from llm_ops_helper.client import ApiError, LLMOpsHelper
from llm_ops_helper.controller.api import build_app
from llm_ops_helper.controller.auth import AuditEntry
from llm_ops_helper.controller.config import parse
from llm_ops_helper.controller.state import DB_FILE, ControllerState, build_state

UPLOAD = "/api/v1/models/m/versions?filename=m.toml"
DEPLOY = "/api/v1/deployments/chat"
SPEC = {"model": "m@1", "replicas": 1, "gpus_per_replica": 0}


def state_for(tmp_path: Path, api: str = "") -> ControllerState:
    return build_state(parse(f'[broker]\nhost = "x"\n[state]\ndir = "{tmp_path}"\n'
                             f"[api]\n{api}\n", str(tmp_path / "c.toml")))


class Api:
    def __init__(self, client: TestClient[Any, Any], state: ControllerState) -> None:
        self.client, self.state = client, state
        self.tokens: dict[str, str] = {}
        for role in ("viewer", "operator", "admin"):
            state.tokens.revoke(f"the-{role}")  # from a previous serving of the same state
            self.tokens[role] = state.tokens.create(f"the-{role}", role, "test")  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    async def call(self, method: str, path: str, role: str | None = None,
                   headers: dict[str, str] | None = None, **kwargs: Any) -> tuple[int, Any]:
        sent = dict(headers or {})
        if role is not None:
            sent["Authorization"] = f"Bearer {self.tokens[role]}"
        async with self.client.request(method, path, headers=sent, **kwargs) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            if r.status == 401:
                assert r.headers["WWW-Authenticate"].startswith("Bearer ")
            return r.status, body


async def serving(state: ControllerState) -> AsyncIterator[Api]:
    client = TestClient(TestServer(build_app(state)))
    await client.start_server()
    try:
        yield Api(client, state)
    finally:
        await client.close()
        state.store.close()
        state.tokens.close()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async for served in serving(state_for(tmp_path)):
        yield served


async def test_no_malformed_unknown_or_revoked_token_is_401(api: Api) -> None:
    hosts = "/api/v1/hosts"
    assert (await api.call("GET", hosts))[1]["error"].startswith("no token")
    for header in ("Basic dXNlcjpwdw==", "Bearer", "Bearer a b"):
        status, body = await api.call("GET", hosts, headers={"Authorization": header})
        assert (status, body["error"]) == (
            401, "malformed Authorization header: expected 'Bearer TOKEN'")
    status, body = await api.call("GET", hosts, headers={"Authorization": "Bearer nope"})
    assert (status, body) == (401, {"error": "unknown token", "status": 401})
    assert (await api.call("GET", hosts, "viewer"))[0] == 200
    assert api.state.tokens.revoke("the-viewer")
    assert await api.call("GET", hosts, "viewer") == (
        401, {"error": "token 'the-viewer' is revoked", "status": 401})
    # Closed by default, unknown paths and /metrics included; /healthz is open.
    assert (await api.call("GET", "/api/v1/nothing"))[0] == 401
    assert (await api.call("GET", "/metrics"))[0] == 401
    assert (await api.call("GET", "/healthz"))[0] == 503  # no broker link: up, but degraded
    assert (await api.call("GET", "/api/v1/nothing", "admin"))[0] == 404


async def test_each_role_may_do_what_its_routes_need(api: Api) -> None:
    assert (await api.call("GET", "/api/v1/hosts", "viewer"))[0] == 200
    assert (await api.call("GET", "/metrics", "viewer"))[0] == 200
    assert (await api.call("POST", UPLOAD, "viewer", data=b"[sim]\n"))[0] == 403
    status, body = await api.call("POST", UPLOAD, "operator", data=b"[sim]\n")
    assert status == 201 and body["created_by"] == "the-operator", body
    status, body = await api.call("PUT", DEPLOY, "viewer", json=SPEC)
    assert (status, body["error"]) == (403, "PUT /api/v1/deployments/{name} needs the role "
                                            "'operator'; token 'the-viewer' has 'viewer'")
    assert (await api.call("PUT", DEPLOY, "operator", json=SPEC))[0] == 201
    stage = "/api/v1/models/m/versions/1/stage"
    status, body = await api.call("POST", stage, "operator", json={"stage": "staging"})
    assert (status, body["error"]) == (403, "POST /api/v1/models/{name}/versions/{number}/"
                                            "stage needs the role 'admin'; token "
                                            "'the-operator' has 'operator'")
    assert (await api.call("POST", stage, "admin", json={"stage": "staging"}))[0] == 200
    assert (await api.call("GET", "/api/v1/audit", "operator"))[0] == 403
    assert (await api.call("GET", "/api/v1/audit", "admin"))[0] == 200


async def test_tokens_are_kept_as_their_sha256_only(api: Api, tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_FILE)
    rows = db.execute("SELECT * FROM api_tokens").fetchall()
    db.close()
    dump = repr(rows)
    assert len(rows) == 3
    for token in api.tokens.values():
        assert token not in dump
        assert hashlib.sha256(token.encode()).hexdigest() in dump


async def test_every_mutating_call_is_audited_refused_ones_too(api: Api) -> None:
    before = time.time()
    user = {"X-LLMOps-User": "alice"}
    assert (await api.call("POST", UPLOAD, "operator", user, data=b"[sim]\n"))[0] == 201
    assert (await api.call("PUT", DEPLOY, "viewer", user, json=SPEC))[0] == 403
    assert (await api.call("DELETE", DEPLOY))[0] == 401
    assert (await api.call("GET", "/api/v1/hosts", "viewer"))[0] == 200  # reads are not
    status, body = await api.call("GET", f"/api/v1/audit?since={before}", "admin")
    assert status == 200 and body["count"] == 3
    entries = [AuditEntry(**e) for e in body["entries"]]
    assert all(e.ts >= before and e.remote == "127.0.0.1" for e in entries)
    assert [(e.who, e.role, e.client_user, e.method, e.path, e.status) for e in entries] == [
        ("", "", "", "DELETE", DEPLOY, 401),
        ("the-viewer", "viewer", "alice", "PUT", DEPLOY, 403),
        ("the-operator", "operator", "alice", "POST", UPLOAD, 201)]
    assert entries[2].result == "ok"
    assert entries[1].result.startswith("PUT /api/v1/deployments/{name} needs the role")
    assert entries[0].result.startswith("no token")
    _, one = await api.call("GET", "/api/v1/audit?limit=1", "admin")
    assert [e["method"] for e in one["entries"]] == ["DELETE"]
    _, none = await api.call("GET", f"/api/v1/audit?since={time.time() + 60}", "admin")
    assert none == {"entries": [], "count": 0}
    assert (await api.call("GET", "/api/v1/audit?limit=0", "admin"))[0] == 400
    assert api.state.tokens.prune(time.time() + 1) == 3
    assert api.state.tokens.audit_log() == []


async def test_forwarded_address_and_public_metrics_only_when_configured(
        tmp_path: Path) -> None:
    forwarded = {"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}
    async for api in serving(state_for(tmp_path / "a")):
        await api.call("DELETE", DEPLOY, "operator", forwarded)
        assert [e.remote for e in api.state.tokens.audit_log()] == ["127.0.0.1"]
    config = "trust_forwarded = true\nmetrics_public = true"
    async for api in serving(state_for(tmp_path / "b", config)):
        await api.call("DELETE", DEPLOY, "operator", forwarded)
        assert [e.remote for e in api.state.tokens.audit_log()] == ["203.0.113.7"]
        assert (await api.call("GET", "/metrics"))[0] == 200
        assert (await api.call("GET", "/api/v1/hosts"))[0] == 401


async def test_bootstrap_token_file_registers_an_admin(tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("first-bootstrap-token-0123456789\n")
    api_section = f'bootstrap_token_file = "{token_file}"'
    async for api in serving(state_for(tmp_path, api_section)):
        bearer = {"Authorization": "Bearer first-bootstrap-token-0123456789"}
        assert (await api.call("GET", "/api/v1/audit", headers=bearer))[0] == 200
    state = state_for(tmp_path, api_section)  # a restart: the same token, registered once
    assert [(t.name, t.role) for t in state.tokens.tokens() if t.name == "bootstrap"] == [
        ("bootstrap", "admin")]
    state.store.close()
    token_file.write_text("second-bootstrap-token-0123456789\n")  # replaced: the old one goes
    async for api in serving(state_for(tmp_path, api_section)):
        old = {"Authorization": "Bearer first-bootstrap-token-0123456789"}
        new = {"Authorization": "Bearer second-bootstrap-token-0123456789"}
        assert (await api.call("GET", "/api/v1/hosts", headers=old))[0] == 401
        assert (await api.call("GET", "/api/v1/hosts", headers=new))[0] == 200
    token_file.unlink()  # absent: nothing registered, nothing fails
    state_for(tmp_path, api_section).store.close()


async def test_tokens_cli_creates_lists_and_revokes(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--state-dir", str(tmp_path)]
    assert cli.main(["tokens", "create", "ci", "--role", "operator", *where]) == 0
    token = capsys.readouterr().out.strip()
    assert cli.main(["tokens", "create", "ci", "--role", "viewer", *where]) == 1
    assert "a token named 'ci' exists already" in capsys.readouterr().err
    async for api in serving(state_for(tmp_path)):
        bearer = {"Authorization": f"Bearer {token}"}
        assert (await api.call("PUT", DEPLOY, headers=bearer, json=SPEC))[0] == 404  # past auth: no m@1
        assert cli.main(["tokens", "list", *where]) == 0
        listed = capsys.readouterr().out
        assert "ci" in listed and "operator" in listed and token not in listed
        assert cli.main(["tokens", "revoke", "ci", *where]) == 0
        assert (await api.call("PUT", DEPLOY, headers=bearer, json=SPEC))[0] == 401
    assert cli.main(["tokens", "revoke", "ci", *where]) == 1
    assert cli.main(["tokens", "list", "--all", *where]) == 0
    assert "revoked" in capsys.readouterr().out


async def test_the_sdk_sends_the_token_from_llmops_token_file(
        api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMOPS_TOKEN", raising=False)
    monkeypatch.delenv("LLMOPS_TOKEN_FILE", raising=False)
    with pytest.raises(ApiError) as refused:
        await asyncio.to_thread(LLMOpsHelper(api.url).list_models)
    assert refused.value.status == 401
    token_file = tmp_path / "viewer.token"
    token_file.write_text(api.tokens["viewer"] + "\n")
    monkeypatch.setenv("LLMOPS_TOKEN_FILE", str(token_file))
    assert await asyncio.to_thread(LLMOpsHelper(api.url).list_models) == []


async def test_artifacts_open_to_a_token_or_to_a_url_signed_for_a_host(api: Api) -> None:
    # Agents download without an API token: the URL in their signed deploy command carries a
    # signature for their host, minted by the controller; nothing else opens the route.
    status, version = await api.call("POST", UPLOAD, "operator", data=b"[sim]\n")
    assert status == 201
    sha = version["artifact"]["sha256"]
    path = f"/api/v1/artifacts/{sha}"
    assert api.state.url_signer is not None
    signed = f"{path}?{api.state.url_signer.query(sha, 'gpu-01')}"
    assert (await api.call("GET", signed))[0] == 200
    assert (await api.call("GET", path, "viewer"))[0] == 200
    assert (await api.call("GET", path))[0] == 401
    assert (await api.call("GET", signed.replace("gpu-01", "gpu-02")))[0] == 401
    assert (await api.call("GET", f"{path}?host=gpu-01&sig={'0' * 64}"))[0] == 401
    other = "f" * 64
    assert (await api.call("GET", f"/api/v1/artifacts/{other}?"
                                  f"{api.state.url_signer.query(sha, 'gpu-01')}"))[0] == 401
