"""The controller API's OpenAPI 3.1 document, served at ``GET /api/v1/openapi.json`` (open).

Paths come from the running app's router, so the document lists exactly what is served; what
each route does, its parameters, bodies and answers come from :data:`OPERATIONS`, and the role
it needs from :func:`auth.required_role`, the same function the middleware asks. A route
registered without an entry here is listed by :func:`undocumented` (a test keeps it empty) and
served with a placeholder summary rather than left out.

Request bodies that are msgspec structs (a deployment spec, a stage change) are described by
their JSON Schema, generated from the struct the handler decodes with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from llm_ops_helper import __version__
from llm_ops_helper.controller import auth
from llm_ops_helper.controller.deployments.spec import DeploymentSpec
from llm_ops_helper.controller.registry.api import AliasTarget, StageChange
from llm_ops_helper.proto.messages import Alert

PATH = "/api/v1/openapi.json"
DOCUMENTED_PREFIXES = ("/api/v1/", "/healthz", "/metrics", "/ui/")
_PLACEHOLDER = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


@dataclass(frozen=True)
class Param:
    name: str
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    where: str = "query"
    required: bool = False


@dataclass(frozen=True)
class Op:
    summary: str
    description: str = ""
    tag: str = "fleet"
    params: tuple[Param, ...] = ()
    # media type -> schema of the request body
    body: dict[str, dict[str, Any]] | None = None
    # False where the route also accepts no body at all.
    body_required: bool = True
    # status -> (description, media type or "", schema or None)
    responses: dict[str, tuple[str, str, dict[str, Any] | None]] = field(default_factory=dict)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _int(low: int, high: int, default: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high, "default": default}


_JSON = "application/json"
_OBJECT: dict[str, Any] = {"type": "object"}
LIMIT = Param("limit", "Most entries returned (newest first).", _int(1, 10_000, 100))
LIMIT_200 = Param("limit", "Most entries returned (newest first).", _int(1, 10_000, 200))
SINCE = Param("since", "Only entries at or after this time (unix seconds).", {"type": "number"})
HOST = Param("host", "Only this host's entries.")

# Path parameters, by name, wherever they appear.
PATH_PARAMS: dict[str, str] = {
    "host": "A host name, as its agent publishes it (GET /api/v1/hosts lists them).",
    "name": "A model or deployment name.",
    "ref": "A version number or an alias (`3`, `production`).",
    "number": "A version number.",
    "alias": "An alias name (`production`, `canary`, ...).",
    "sha256": "The artifact's sha256, 64 lowercase hex digits.",
    "file": "A static file of the dashboard (JavaScript, CSS).",
}


def _ok(description: str, schema: dict[str, Any] | None = None,
        media: str = _JSON) -> dict[str, tuple[str, str, dict[str, Any] | None]]:
    return {"200": (description, media, schema or _OBJECT)}


def _list_of(key: str, item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": [key, "count"],
            "properties": {key: {"type": "array", "items": item}, "count": {"type": "integer"}}}


OPERATIONS: dict[tuple[str, str], Op] = {
    ("GET", "/healthz"): Op(
        "Liveness and broker link", "200 while the controller's MQTT link is up, 503 while "
        "it is down. Open: no token.", "operations",
        responses={"200": ("Connected to the broker.", _JSON, _OBJECT),
                   "503": ("The broker link is down.", _JSON, _OBJECT)}),
    ("GET", "/metrics"): Op(
        "Prometheus metrics", "Fleet gauges, ingest counters and drops by reason, alerts, "
        "deployments. Needs a viewer token unless `[api] metrics_public = true`.",
        "operations", responses=_ok("Prometheus text exposition format.",
                                    {"type": "string"}, "text/plain")),
    ("GET", PATH): Op(
        "This OpenAPI document", "Open: no token.", "operations",
        responses=_ok("OpenAPI 3.1 document.")),
    ("GET", "/"): Op(
        "The dashboard page", "Static HTML; it signs in with an API token typed in, or passed "
        "as `/#token=...`, and calls the API with it. Open.", "dashboard",
        responses=_ok("HTML page.", {"type": "string"}, "text/html")),
    ("GET", "/ui/{file}"): Op(
        "The dashboard's static files", "Open.", "dashboard",
        responses={"200": ("The file.", "", None), "404": ("No such file.", "", None)}),
    ("GET", "/api/v1/overview"): Op(
        "Fleet overview for the dashboard",
        "Hosts with their GPUs (utilisation, memory, temperature, power, health), deployments "
        "with their replicas, and firing alerts, in one document, built at most once a second "
        "(it may be up to 2 s old).", "dashboard",
        responses=_ok("Keys `ts`, `hosts`, `deployments`, `alerts`.", {
            "type": "object", "required": ["ts", "hosts", "deployments", "alerts"],
            "properties": {"ts": {"type": "number"},
                           "hosts": {"type": "array", "items": _OBJECT},
                           "deployments": {"type": "array", "items": _OBJECT},
                           "alerts": {"type": "array", "items": _OBJECT}}})),
    ("GET", "/api/v1/stream"): Op(
        "Live overview (server-sent events)",
        "`event: overview` with the overview document every second (the first at once), "
        "`: keep-alive` comments in between; ends when the controller stops.", "dashboard",
        responses=_ok("An event stream.", {"type": "string"}, "text/event-stream")),
    ("GET", "/api/v1/hosts"): Op(
        "Hosts, online or offline", "Each host's state, why it is offline (`lost`, "
        "`shutdown`, `stale`), last telemetry time, GPU and replica counts, agent version.",
        params=(Param("state", "Only online or only offline hosts.",
                      {"type": "string", "enum": ["online", "offline"]}),),
        responses=_ok("Hosts sorted by name.", _list_of("hosts", _OBJECT))),
    ("GET", "/api/v1/hosts/{host}"): Op(
        "One host in detail", "Its summary plus the last status and telemetry, sequence gaps, "
        "replica states, recent events and firing alerts.",
        responses={**_ok("The host."), "404": ("No such host.", _JSON, _ref("Error"))}),
    ("GET", "/api/v1/alerts"): Op(
        "Alerts", "Firing alerts by default, newest first. `id` returns one alert whatever "
        "its state (the link in notifications).", "alerts",
        params=(Param("state", "Which alerts.", {"type": "string", "default": "firing",
                                                 "enum": ["firing", "resolved", "all"]}),
                LIMIT, HOST, Param("id", "One alert by id.")),
        responses=_ok("Alerts.", _list_of("alerts", _ref("Alert")))),
    ("GET", "/api/v1/anomalies"): Op(
        "Recent anomaly detections", "Each names its series, the feature that drove it, the "
        "value and what was expected, and its score.", "alerts",
        params=(LIMIT, SINCE, HOST),
        responses=_ok("Detections, newest first.", _list_of("anomalies", _OBJECT))),
    ("GET", "/api/v1/audit"): Op(
        "The audit log", "Every mutating call, refused ones too: who, role, method, path, "
        "remote address, status, result.", "operations", params=(LIMIT, SINCE),
        responses=_ok("Entries, newest first.", _list_of("entries", _ref("AuditEntry")))),
    ("GET", "/api/v1/models"): Op(
        "Models in the repository", tag="models", responses=_ok("`{models: [...]}`.")),
    ("GET", "/api/v1/models/{name}"): Op(
        "A model: its versions and aliases", tag="models",
        responses={**_ok("`{name, aliases, versions}`."),
                   "404": ("No such model.", _JSON, _ref("Error"))}),
    ("POST", "/api/v1/models/{name}/versions"): Op(
        "Upload a new version", "The body is the artifact, streamed to disk and stored once "
        "by sha256; an interrupted upload leaves nothing. Metadata travels in the query.",
        "models",
        params=(Param("filename", "The artifact's file name (its extension names the format "
                                  "when `format` is absent)."),
                Param("runtime", "Runtime that serves it: llamacpp, vllm, sglang, sim, "
                                 "command."),
                Param("format", "Artifact format (gguf, safetensors, ...)."),
                Param("sha256", "Expected sha256; a mismatch refuses the upload."),
                Param("source_uri", "Where the model came from (no body: a reference only)."),
                Param("parameters", "Parameter count: 7000000000, 7B, 500M."),
                Param("quantization", "Quantisation (Q4_K_M, fp16, ...)."),
                Param("description", "Free text."),
                Param("tag", "key=value; repeat for several.")),
        body={"application/octet-stream": {"type": "string", "format": "binary"}},
        body_required=False,  # none with source_uri: a reference only
        responses={"201": ("The new version (Location: its URL).", _JSON, _OBJECT),
                   "400": ("A bad parameter.", _JSON, _ref("Error")),
                   "413": ("Over `[registry] max_upload_bytes`.", _JSON, _ref("Error"))}),
    ("GET", "/api/v1/models/{name}/versions/{ref}"): Op(
        "One version, by number or alias", tag="models", responses=_ok("The version.")),
    ("POST", "/api/v1/models/{name}/versions/{number}/stage"): Op(
        "Move a version to a stage",
        "Stages move only along registered -> staging -> production -> archived -> retired; "
        "promoting to production moves the `production` alias and archives the version it "
        "replaces (unless `archive_previous` is false).", "models",
        body={_JSON: _ref("StageChange")}, responses=_ok("The version.")),
    ("PUT", "/api/v1/models/{name}/aliases/{alias}"): Op(
        "Point an alias at a version", "Atomic; answers the version it pointed at before.",
        "models", body={_JSON: _ref("AliasTarget")},
        responses=_ok("`{alias, version, previous}`.")),
    ("DELETE", "/api/v1/models/{name}/aliases/{alias}"): Op(
        "Remove an alias", tag="models", responses=_ok("`{alias, previous}`.")),
    ("GET", "/api/v1/models/{name}/diff"): Op(
        "What changed between two versions", tag="models",
        params=(Param("from", "A version number or alias.", required=True),
                Param("to", "A version number or alias.", required=True)),
        responses=_ok("Changed fields as [old, new].")),
    ("GET", "/api/v1/models/{name}/lineage"): Op(
        "The model's history", "Registrations, stage changes and alias moves, oldest first.",
        "models", responses=_ok("`{events: [...]}`.")),
    ("GET", "/api/v1/artifacts/{sha256}"): Op(
        "Download an artifact", "Range requests and HEAD are supported; the sha256 is a strong "
        "ETag. Agents use the URL the controller signed for them (`host` and `sig`) in place of "
        "a token.", "models",
        params=(Param("host", "With `sig`: the host the URL was signed for."),
                Param("sig", "The controller's signature of this artifact for `host`."),
                Param("Range", "A byte range, to resume.", where="header")),
        responses={"200": ("The bytes.", "application/octet-stream",
                           {"type": "string", "format": "binary"}),
                   "206": ("The requested range.", "application/octet-stream",
                           {"type": "string", "format": "binary"}),
                   "304": ("Not modified (If-None-Match).", "", None)}),
    ("GET", "/api/v1/deployments"): Op(
        "Deployments", tag="deployments", responses=_ok("`{deployments: [...]}`.")),
    ("PUT", "/api/v1/deployments/{name}"): Op(
        "Create or change a deployment", "Desired state; the reconciler places replicas, "
        "rolls out a changed spec (max_surge / max_unavailable, canary hold) and rolls back by "
        "itself when the new version fails.", "deployments",
        body={_JSON: _ref("DeploymentSpec")},
        responses={"200": ("Changed.", _JSON, _OBJECT), "201": ("Created.", _JSON, _OBJECT),
                   "400": ("A bad spec, naming the field.", _JSON, _ref("Error"))}),
    ("GET", "/api/v1/deployments/{name}"): Op(
        "One deployment", "Phase and message, version, desired and ready counts, replicas "
        "(host, GPUs, state, URL) and where they were placed and why.", "deployments",
        responses=_ok("The deployment.")),
    ("DELETE", "/api/v1/deployments/{name}"): Op(
        "Stop and remove a deployment", "Replicas drain, then stop.", "deployments",
        responses={"202": ("Accepted; replicas are draining.", _JSON, _OBJECT)}),
    ("POST", "/api/v1/deployments/{name}/scale"): Op(
        "Set the replica count", "Scaling down drains: requests in flight finish.",
        "deployments",
        body={_JSON: {"type": "object", "required": ["replicas"],
                      "properties": {"replicas": {"type": "integer", "minimum": 0}},
                      "additionalProperties": False}},
        responses=_ok("The deployment.")),
    ("POST", "/api/v1/deployments/{name}/rollback"): Op(
        "Roll back", "To the version before, or to `version` (name@N).", "deployments",
        body={_JSON: {"type": "object", "additionalProperties": False,
                      "properties": {"version": {"type": ["string", "null"]}}}},
        body_required=False, responses=_ok("The deployment.")),
    ("GET", "/api/v1/deployments/{name}/endpoints"): Op(
        "Ready replica URLs", "What the gateway routes to; draining replicas leave this list "
        "first.", "deployments", responses=_ok("`{endpoints: [...]}`.")),
    ("GET", "/api/v1/deployments/{name}/history"): Op(
        "Revisions and events", tag="deployments", params=(LIMIT_200,),
        responses=_ok("Revisions and events, newest first.")),
    ("GET", "/api/v1/deployments/{name}/decisions"): Op(
        "Autoscaler decisions", "Each with its inputs, forecast, learned capacity, the rule "
        "that decided and the reason.", "deployments", params=(LIMIT,),
        responses={**_ok("`{deployment, mode, decisions, count}`."),
                   "404": ("No such deployment, ever.", _JSON, _ref("Error"))}),
}

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error", "status"],
    "properties": {"error": {"type": "string", "description": "What was wrong, naming the "
                                                              "parameter or field."},
                   "status": {"type": "integer"}}}


def served_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, pattern) of every route the document covers, in registration order; HEAD is
    implied by GET."""
    found: list[tuple[str, str]] = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method in ("HEAD", "OPTIONS", "*"):
            continue
        pattern = resource.canonical
        wanted = pattern == "/" or pattern.startswith(DOCUMENTED_PREFIXES)
        if wanted and (route.method, pattern) not in found:
            found.append((route.method, pattern))
    return found


def undocumented(app: web.Application) -> list[tuple[str, str]]:
    return [r for r in served_routes(app) if r not in OPERATIONS]


def _operation(method: str, pattern: str) -> dict[str, Any]:
    op = OPERATIONS.get((method, pattern)) or Op("(not yet documented)")
    role = auth.required_role(method, pattern)
    params = [Param(name, PATH_PARAMS.get(name, name), where="path", required=True)
              for name in _PLACEHOLDER.findall(pattern)] + list(op.params)
    access = ("Open: no token needed." if role is None
              else f"Needs a bearer token with the role `{role}` or higher.")
    out: dict[str, Any] = {
        "operationId": f"{method.lower()}_" + re.sub(r"[^a-z0-9]+", "_",
                                                     pattern.lower()).strip("_"),
        "summary": op.summary,
        "description": f"{op.description} {access}".strip(),
        "tags": [op.tag],
        "x-llmops-role": role,
        "parameters": [{"name": p.name, "in": p.where, "required": p.required,
                        "description": p.description, "schema": p.schema} for p in params],
        "responses": {status: ({"description": text} | (
            {"content": {media: {"schema": schema} if schema is not None else {}}}
            if media else {})) for status, (text, media, schema) in
            (op.responses or _ok("OK")).items()},
    }
    if role is None:
        out["security"] = []
    elif (method, pattern) in auth.SIGNED_ROUTES:
        out["security"] = [{"bearer": []}, {"signedUrl": []}]
    if role is not None:
        out["responses"].setdefault("401", {"description": "No token, or an unknown or "
                                            "revoked one.", "content": {_JSON: {
                                                "schema": _ref("Error")}}})
        out["responses"].setdefault("403", {"description": f"The token's role is below "
                                            f"`{role}`.", "content": {_JSON: {
                                                "schema": _ref("Error")}}})
    if op.body is not None:
        out["requestBody"] = {"required": op.body_required, "content": {
            media: {"schema": schema} for media, schema in op.body.items()}}
    return out


def document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route ``app`` serves."""
    paths: dict[str, dict[str, Any]] = {}
    for method, pattern in served_routes(app):
        paths.setdefault(pattern, {})[method.lower()] = _operation(method, pattern)
    _, schemas = msgspec.json.schema_components(
        [DeploymentSpec, StageChange, AliasTarget, Alert, auth.AuditEntry],
        ref_template="#/components/schemas/{name}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM Ops Helper controller API", "version": __version__,
                 "description": "Fleet state, alerts, the model repository, deployments and "
                                "autoscaling. Roles: viewer (reads) < operator (deploy, scale, "
                                "roll back, upload) < admin (model stages and aliases, the "
                                "audit log). Errors are `{\"error\", \"status\"}`."},
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "security": [{"bearer": []}],
        "tags": [{"name": t} for t in ("fleet", "alerts", "models", "deployments",
                                       "dashboard", "operations")],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "An API token (`llmops tokens create NAME --role "
                                          "viewer|operator|admin` on the head node)."},
                "signedUrl": {"type": "apiKey", "in": "query", "name": "sig",
                              "description": "A URL the controller signed for one host (with "
                                             "`host`), sent inside a signed deploy command."}},
            "schemas": {"Error": _ERROR_SCHEMA} | schemas,
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(document(request.app))


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH, openapi_json)
