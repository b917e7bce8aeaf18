"""The model repository's HTTP routes (added to the controller's aiohttp app).

Uploads stream: the body is read in chunks straight into the blob directory, never whole
into memory. Errors are JSON ``{"error": ..., "status": ...}`` like the rest of the API;
every handler answers its own errors, so the routes behave the same on any app.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import hdrs, web

from llm_ops_helper.controller.auth import caller_name
from llm_ops_helper.controller.registry.errors import Invalid, RegistryError, TooLarge
from llm_ops_helper.controller.registry.records import (
    NewVersion,
    check_sha256,
    is_number,
    parse_parameters,
    parse_tag,
)
from llm_ops_helper.controller.registry.registry import Registry

UPLOAD_CHUNK_BYTES = 1 << 20
_UPLOAD_PARAMS = frozenset({"runtime", "format", "filename", "sha256", "source_uri",
                            "parameters", "quantization", "description", "tag"})
_json = msgspec.json.Encoder()
_T = TypeVar("_T")


class StageChange(msgspec.Struct, forbid_unknown_fields=True):
    stage: str
    archive_previous: bool = True


class AliasTarget(msgspec.Struct, forbid_unknown_fields=True):
    version: int


def add_routes(app: web.Application, registry: Registry, *,
               public_url: Callable[[], str]) -> None:
    routes = _Routes(registry, public_url)
    router = app.router
    router.add_get("/api/v1/models", routes.models)
    router.add_get("/api/v1/models/{name}", routes.model)
    router.add_post("/api/v1/models/{name}/versions", routes.upload)
    router.add_get("/api/v1/models/{name}/versions/{ref}", routes.version)
    router.add_post("/api/v1/models/{name}/versions/{number}/stage", routes.stage)
    router.add_put("/api/v1/models/{name}/aliases/{alias}", routes.set_alias)
    router.add_delete("/api/v1/models/{name}/aliases/{alias}", routes.delete_alias)
    router.add_get("/api/v1/models/{name}/diff", routes.diff)
    router.add_get("/api/v1/models/{name}/lineage", routes.lineage)
    router.add_get("/api/v1/artifacts/{sha256}", routes.artifact)  # HEAD too


def artifact_url(public_url: str, sha256: str) -> str:
    """Where an agent downloads a blob (Range requests supported)."""
    return f"{public_url.rstrip('/')}/api/v1/artifacts/{sha256}"


def respond(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(data), status=status,
                        content_type="application/json")


def _answers_errors(handler: Callable[[Any, web.Request], Awaitable[web.StreamResponse]]
                    ) -> Callable[[Any, web.Request], Awaitable[web.StreamResponse]]:
    @functools.wraps(handler)
    async def wrapped(self: Any, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except RegistryError as exc:
            return respond({"error": exc.message, "status": exc.status}, exc.status)
    return wrapped


class _Routes:
    def __init__(self, registry: Registry, public_url: Callable[[], str]) -> None:
        self.registry = registry
        self.public_url = public_url

    @_answers_errors
    async def models(self, request: web.Request) -> web.StreamResponse:
        return respond({"models": self.registry.models()})

    @_answers_errors
    async def model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        versions = self.registry.versions(name)
        return respond({"name": name, "aliases": self.registry.aliases(name),
                        "versions": versions})

    @_answers_errors
    async def upload(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        meta = _new_version(request)
        self.registry.check_new(name, meta)
        limit = self.registry.max_artifact_bytes
        if limit is not None and (request.content_length or 0) > limit:
            raise TooLarge(f"upload of {request.content_length} bytes is over the limit of "
                           f"{limit} bytes")
        expected = request.query.get("sha256")
        chunks = request.content.iter_chunked(UPLOAD_CHUNK_BYTES) if request.body_exists \
            else None
        version = await self.registry.register(
            name, meta, chunks, expected_sha256=expected.lower() if expected else None,
            by=caller_name(request))
        response = respond(version, 201)
        response.headers[hdrs.LOCATION] = (f"{self.public_url().rstrip('/')}/api/v1/models/"
                                           f"{name}/versions/{version.version}")
        return response

    @_answers_errors
    async def version(self, request: web.Request) -> web.StreamResponse:
        return respond(self.registry.version(request.match_info["name"],
                                             request.match_info["ref"]))

    @_answers_errors
    async def stage(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request, StageChange)
        version = self.registry.set_stage(
            request.match_info["name"], _number(request.match_info["number"], "version"),
            body.stage, archive_previous=body.archive_previous, by=caller_name(request))
        return respond(version)

    @_answers_errors
    async def set_alias(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request, AliasTarget)
        alias = request.match_info["alias"]
        previous = self.registry.set_alias(request.match_info["name"], alias, body.version,
                                           by=caller_name(request))
        return respond({"alias": alias, "version": body.version, "previous": previous})

    @_answers_errors
    async def delete_alias(self, request: web.Request) -> web.StreamResponse:
        alias = request.match_info["alias"]
        previous = self.registry.delete_alias(request.match_info["name"], alias,
                                              by=caller_name(request))
        return respond({"alias": alias, "previous": previous})

    @_answers_errors
    async def diff(self, request: web.Request) -> web.StreamResponse:
        refs = [request.query.get(p) for p in ("from", "to")]
        if refs[0] is None or refs[1] is None:
            raise Invalid("diff needs both parameters: ?from=A&to=B (version numbers or "
                          "aliases)")
        return respond(self.registry.diff(request.match_info["name"], refs[0], refs[1]))

    @_answers_errors
    async def lineage(self, request: web.Request) -> web.StreamResponse:
        return respond({"events": self.registry.lineage(request.match_info["name"])})

    @_answers_errors
    async def artifact(self, request: web.Request) -> web.StreamResponse:
        sha256 = request.match_info["sha256"]
        path = self.registry.artifact_path(check_sha256(sha256))
        if request.if_none_match and any(e.value == sha256 for e in request.if_none_match):
            return web.Response(status=304, headers={hdrs.ETAG: f'"{sha256}"'})
        return _BlobResponse(path, sha256)


class _BlobResponse(web.FileResponse):
    """A blob download: Range and HEAD from FileResponse, the digest as a strong ETag."""

    def __init__(self, path: Any, sha256: str) -> None:
        self._sha256 = sha256
        super().__init__(path, headers={
            hdrs.CONTENT_TYPE: "application/octet-stream",
            hdrs.CACHE_CONTROL: "public, max-age=31536000, immutable"})

    @property
    def etag(self) -> Any:
        return super().etag

    @etag.setter
    def etag(self, value: Any) -> None:
        # FileResponse derives an ETag from mtime and size; a blob's name is a better one.
        self.headers[hdrs.ETAG] = f'"{self._sha256}"'


def _new_version(request: web.Request) -> NewVersion:
    query = request.query
    unknown = sorted(set(query) - _UPLOAD_PARAMS)
    if unknown:
        raise Invalid(f"unknown parameter {unknown[0]!r}: expected "
                      f"{', '.join(sorted(_UPLOAD_PARAMS))}")
    parameters = query.get("parameters")
    return NewVersion(
        runtime=query.get("runtime"), format=query.get("format"),
        filename=query.get("filename"), source_uri=query.get("source_uri"),
        parameters=parse_parameters(parameters) if parameters else None,
        quantization=query.get("quantization"), description=query.get("description", ""),
        tags=dict(parse_tag(raw) for raw in query.getall("tag", [])))


async def _body(request: web.Request, kind: type[_T]) -> _T:
    try:
        return msgspec.json.decode(await request.read(), type=kind)
    except msgspec.DecodeError as exc:
        raise Invalid(f"body: {exc}") from None


def _number(raw: str, what: str) -> int:
    if not is_number(raw):
        raise Invalid(f"{what} {raw!r}: expected a number of at most 9 digits")
    return int(raw)
