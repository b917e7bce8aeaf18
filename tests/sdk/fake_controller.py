"""A test double of the controller's HTTP API, for the client's tests.

It serves, over real HTTP (aiohttp on a free local port), just enough of the issue-4 contract's
routes — model versions with streamed uploads, stages, aliases, diff, deployments with a
scripted rollout — to exercise `LLMOpsHelper` and the ``llmops`` commands. It is not the
controller: the end-to-end tests run the real one. Every request is recorded for assertions.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# The real controller's stage table, runtime list and refusal text: the errors the client
# passes on are worded here as the controller words them (controller/registry/registry.py,
# controller/deployments/ledger.py and desired.py for the texts written out below).
from llm_ops_helper.controller.registry import lifecycle
from llm_ops_helper.controller.registry.formats import RUNTIMES


@dataclass
class Upload:
    """What one POST of a model version brought: headers, chunk sizes, the body's hash."""

    content_length: int | None
    transfer_encoding: str | None
    chunks: list[int]
    sha256: str
    query: dict[str, list[str]]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any = None


@dataclass
class FakeController:
    """In-memory models and deployments. ``rollout`` scripts the states that the GETs of the
    next PUT deployment walk through, one per GET (the last one stays); each is a patch of the
    deployment: phase, ready, message, version, replica_state, replica_reason."""

    url: str = ""
    versions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    aliases: dict[str, dict[str, int]] = field(default_factory=dict)
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    plans: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    rollout: list[dict[str, Any]] | None = None
    requests: list[Seen] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        models = "/api/v1/models/{name}"
        deployments = "/api/v1/deployments/{name}"
        app.router.add_post(models + "/versions", self.push)
        app.router.add_get("/api/v1/models", self.list_models)
        app.router.add_get(models, self.get_model)
        app.router.add_get(models + "/versions/{ref}", self.get_version)
        app.router.add_post(models + "/versions/{n}/stage", self.stage)
        app.router.add_put(models + "/aliases/{alias}", self.set_alias)
        app.router.add_delete(models + "/aliases/{alias}", self.delete_alias)
        app.router.add_get(models + "/diff", self.diff)
        app.router.add_get("/api/v1/deployments", self.list_deployments)
        app.router.add_put(deployments, self.put_deployment)
        app.router.add_get(deployments, self.get_deployment)
        app.router.add_post(deployments + "/scale", self.scale)
        app.router.add_post(deployments + "/rollback", self.rollback)
        app.router.add_delete(deployments, self.delete_deployment)
        app.router.add_get(deployments + "/endpoints", self.endpoints)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = None
        if request.content_type == "application/json" and request.can_read_body:
            body = await request.json()
        self.requests.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        response: web.StreamResponse = await handler(request)
        return response

    # -- models ----------------------------------------------------------------------------

    async def push(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        digest = hashlib.sha256()
        chunks: list[int] = []
        head = b""
        async for chunk in request.content.iter_any():
            chunks.append(len(chunk))
            digest.update(chunk)
            head = head or chunk[:4096]
        query = {k: request.query.getall(k) for k in request.query}
        self.uploads.append(Upload(request.content_length, request.headers.get(
            "Transfer-Encoding"), chunks, digest.hexdigest(), query))
        expected = request.query.get("sha256")
        if expected and expected != digest.hexdigest():
            return _error(400, f"checksum mismatch: expected {expected}, got "
                               f"{digest.hexdigest()}")
        fmt = "gguf" if head.startswith(b"GGUF") else "sim" if b"[sim]" in head else None
        runtime = request.query.get("runtime") or {"gguf": "llamacpp", "sim": "sim"}.get(fmt or "")
        if runtime is None:
            return _error(400, f"runtime: none is implied by format {fmt or 'unknown'!r}; "
                               f"pass runtime= one of {', '.join(RUNTIMES)}")
        if not chunks and not request.query.get("source_uri"):
            return _error(400, "empty body and no source_uri: upload the artifact, or pass "
                               "source_uri= naming where the runtime finds the model")
        if runtime not in RUNTIMES:
            return _error(400, f"unknown runtime {runtime!r}: expected one of "
                               f"{', '.join(RUNTIMES)}")
        versions = self.versions.setdefault(name, [])
        self.aliases.setdefault(name, {})
        number = len(versions) + 1
        version = {
            "model": name, "version": number, "ref": f"{name}@{number}", "stage": "registered",
            "aliases": [], "runtime": runtime, "format": fmt,
            "artifact": {"sha256": digest.hexdigest(), "size_bytes": sum(chunks),
                         "filename": request.query.get("filename", "")} if chunks else None,
            "source_uri": request.query.get("source_uri"),
            "parameters": int(float(p.rstrip("B")) * 1e9) if (p := request.query.get(
                "parameters")) else None,
            "quantization": request.query.get("quantization"),
            "tags": dict(t.split("=", 1) for t in request.query.getall("tag", [])),
            "description": request.query.get("description", ""),
            "created_by": request.headers.get("X-LLMOps-User", "anonymous"),
            "created_at": time.time(), "replaces": None, "stage_changed_at": None}
        versions.append(version)
        return web.json_response(self._view(version), status=201)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [
            {"name": name, "latest": len(vs), "versions": len(vs), "aliases": self.aliases[name],
             "created_at": vs[0]["created_at"], "updated_at": vs[-1]["created_at"]}
            for name, vs in sorted(self.versions.items())]})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.versions:
            return _no_model(name)
        return web.json_response({"name": name, "aliases": self.aliases[name],
                                  "versions": [self._view(v) for v in self.versions[name]]})

    async def get_version(self, request: web.Request) -> web.Response:
        found = self._resolve(request.match_info["name"], request.match_info["ref"])
        if isinstance(found, web.Response):
            return found
        return web.json_response(self._view(found))

    async def stage(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        found = self._resolve(name, request.match_info["n"])
        if isinstance(found, web.Response):
            return found
        body = await request.json()
        target = body["stage"]
        if target == found["stage"]:  # as the controller: the same stage again is a no-op
            return web.json_response(self._view(found))
        refusal = lifecycle.refusal(found["stage"], target)
        if refusal is not None:
            return _error(400 if target not in lifecycle.STAGES else 409,
                          f"{found['ref']}: {refusal}")
        if target == "retired" and any(d["version"] == found["ref"]
                                       for d in self.deployments.values()):
            return _error(409, f"{found['ref']} is used by a deployment: move the deployment "
                               "to another version before retiring it")
        if target == "production":
            old = self.aliases[name].get("production")
            if old is not None and body.get("archive_previous", True):
                self.versions[name][old - 1]["stage"] = "archived"
                found["replaces"] = old
            self.aliases[name]["production"] = found["version"]
        found["stage"] = target
        found["stage_changed_at"] = time.time()
        return web.json_response(self._view(found))

    async def set_alias(self, request: web.Request) -> web.Response:
        name, alias = request.match_info["name"], request.match_info["alias"]
        found = self._resolve(name, str((await request.json())["version"]))
        if isinstance(found, web.Response):
            return found
        previous = self.aliases[name].get(alias)
        self.aliases[name][alias] = found["version"]
        return web.json_response({"alias": alias, "version": found["version"],
                                  "previous": previous})

    async def delete_alias(self, request: web.Request) -> web.Response:
        name, alias = request.match_info["name"], request.match_info["alias"]
        if name not in self.aliases:
            return _no_model(name)
        if alias not in self.aliases[name]:
            return _no_alias(name, alias, self.aliases[name])
        return web.json_response({"alias": alias, "previous": self.aliases[name].pop(alias)})

    async def diff(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        a = self._resolve(name, request.query["from"])
        b = self._resolve(name, request.query["to"])
        if isinstance(a, web.Response):
            return a
        if isinstance(b, web.Response):
            return b
        fields = ("stage", "runtime", "format", "description", "tags")
        changes = {f: [a[f], b[f]] for f in fields if a[f] != b[f]}
        return web.json_response({
            "from": self._view(a), "to": self._view(b), "changes": changes,
            "artifact": {"same": a["artifact"]["sha256"] == b["artifact"]["sha256"],
                         "size_delta_bytes": b["artifact"]["size_bytes"]
                         - a["artifact"]["size_bytes"]}})

    def _view(self, version: dict[str, Any]) -> dict[str, Any]:
        aliases = [k for k, v in self.aliases[version["model"]].items()
                   if v == version["version"]]
        return {**version, "aliases": sorted(aliases)}

    def _resolve(self, name: str, ref: str) -> dict[str, Any] | web.Response:
        if name not in self.versions:
            return _no_model(name)
        number = int(ref) if ref.isdigit() else self.aliases[name].get(ref)
        if ref == "" and number is None:
            number = len(self.versions[name])
        if number is None:
            return _no_alias(name, ref, self.aliases[name])
        if not 1 <= number <= len(self.versions[name]):
            return _error(404, f"{name} has no version {number} "
                               f"(latest is {len(self.versions[name])})")
        return self.versions[name][number - 1]

    # -- deployments -----------------------------------------------------------------------

    async def put_deployment(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        spec = await request.json()
        model, _, ref = spec["model"].partition("@")
        found = self._resolve(model, ref or str(self.aliases.get(model, {}).get(
            "production", "")))
        if isinstance(found, web.Response):
            return found
        old = self.deployments.get(name)
        state = {"name": name, "spec": spec, "revision": (old["revision"] if old else 0) + 1,
                 "version": found["ref"], "previous_version": old["version"] if old else None,
                 "phase": "progressing", "message": None, "desired": spec["replicas"],
                 "ready": 0, "replicas": [], "placement": [], "updated_at": time.time()}
        self._replicas(state, "pending", None)
        self.deployments[name] = state
        self.plans[name] = list(self.rollout if self.rollout is not None else [
            {"phase": "progressing", "replica_state": "starting"},
            {"phase": "available", "ready": spec["replicas"]}])
        return web.json_response(state, status=200 if old else 201)

    async def get_deployment(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.deployments:
            return _no_deployment(name)
        state = self.deployments[name]
        plan = self.plans.get(name, [])
        if plan:
            patch = plan.pop(0) if len(plan) > 1 else plan[0]
            state.update({k: v for k, v in patch.items() if not k.startswith("replica_")})
            self._replicas(state, patch.get("replica_state"), patch.get("replica_reason"))
        return web.json_response(state)

    async def list_deployments(self, request: web.Request) -> web.Response:
        return web.json_response({"deployments": [d for _, d in sorted(
            self.deployments.items())]})

    async def scale(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.deployments:
            return _no_deployment(name)
        replicas = (await request.json())["replicas"]
        state = self.deployments[name]
        state.update(desired=replicas, phase="progressing")
        self.plans[name] = [{"phase": "available", "ready": replicas}]
        return web.json_response(state)

    async def rollback(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        state = self.deployments.get(name)
        if state is None:
            return _no_deployment(name)
        target = (await request.json()).get("version") or state["previous_version"]
        if target is None:
            return _error(409, f"deployment {name} has no version before {state['version']} "
                               "to roll back to")
        state.update(version=target, previous_version=state["version"], phase="rolling_back",
                     revision=state["revision"] + 1, ready=0)
        self.plans[name] = [{"phase": "rolling_back"},
                            {"phase": "available", "ready": state["desired"]}]
        return web.json_response(state)

    async def delete_deployment(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.deployments.pop(name, None) is None:
            return _no_deployment(name)
        return web.json_response({"name": name, "phase": "deleting"}, status=202)

    async def endpoints(self, request: web.Request) -> web.Response:
        state = self.deployments[request.match_info["name"]]
        return web.json_response({"endpoints": [
            {"replica": r["name"], "host": r["host"], "url": r["url"], "version": r["version"]}
            for r in state["replicas"] if r["state"] == "ready"]})

    def _replicas(self, state: dict[str, Any], replica_state: str | None,
                  reason: str | None) -> None:
        ready = state["ready"]
        state["replicas"] = [
            {"name": f"{state['name']}-r{state['revision']}-{n:06x}", "host": "gpu-1",
             "gpus": [n], "version": state["version"],
             "state": "ready" if n < ready else (replica_state or "pending"),
             "reason": None if n < ready else reason,
             "url": f"http://gpu-1:{9000 + n}/v1", "restarts": 0, "created_at": time.time()}
            for n in range(state["desired"])]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


def _no_model(name: str) -> web.Response:
    return _error(404, f"no such model: {name!r} (GET /api/v1/models lists them)")


def _no_alias(name: str, alias: str, aliases: dict[str, int]) -> web.Response:
    return _error(404, f"{name} has no alias {alias!r} (aliases: "
                       f"{', '.join(aliases) or 'none'})")


def _no_deployment(name: str) -> web.Response:
    return _error(404, f"no deployment named {name!r} (GET /api/v1/deployments lists them)")


@asynccontextmanager
async def serving(fake: FakeController) -> AsyncIterator[FakeController]:
    """Serve ``fake`` on a free port of 127.0.0.1; ``fake.url`` is its base URL."""
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.url = f"http://{host}:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()
