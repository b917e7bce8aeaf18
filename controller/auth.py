"""Who may call the controller's API: bearer tokens with a role, and the audit log.

Roles, each including the one before: ``viewer`` reads; ``operator`` deploys, scales, rolls
back and uploads models (``deploy_model`` uploads before it deploys); ``admin`` changes a
model's lifecycle (stage, aliases), reads the audit log and whatever else is not named here.
A mutating route nobody classified needs admin: the API is closed by default.

Tokens are ``llmops_`` and 32 random bytes (``secrets.token_urlsafe``); SQLite keeps only
their sha256. A salt or a slow hash defends a guessable secret against precomputed or
brute-force guesses; 256 random bits leave nothing to guess, so a plain sha256 is as strong and
lets a request find its token by an index lookup. ``llmops tokens`` (a tool on the head node)
writes the same tables; a revocation counts from the next request, since every request reads
them.

Open without a token: ``/healthz``. Artifact downloads (``GET /api/v1/artifacts/{sha256}``) take
a token or the signature of a URL the controller minted for one host (:class:`UrlSigner`): the
agents fetch what their signed deploy commands name, with no API token of their own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlencode

import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from llm_ops_helper.controller import database

log = structlog.get_logger("llmops.controller.auth")

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
BOOTSTRAP_NAME = "bootstrap"
USER_HEADER = "X-LLMOps-User"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# last_used_at is written at most this often per token: not a write per poll.
LAST_USED_RESOLUTION_S = 60.0

# (method, route pattern) -> the least role; GET/HEAD not named here need viewer, any other
# method admin.
ROUTE_ROLES: dict[tuple[str, str], Role] = {
    ("POST", "/api/v1/models/{name}/versions"): "operator",
    ("POST", "/api/v1/models/{name}/versions/{number}/stage"): "admin",
    ("PUT", "/api/v1/models/{name}/aliases/{alias}"): "admin",
    ("DELETE", "/api/v1/models/{name}/aliases/{alias}"): "admin",
    ("PUT", "/api/v1/deployments/{name}"): "operator",
    ("DELETE", "/api/v1/deployments/{name}"): "operator",
    ("POST", "/api/v1/deployments/{name}/scale"): "operator",
    ("POST", "/api/v1/deployments/{name}/rollback"): "operator",
    ("GET", "/api/v1/audit"): "admin",
}
# The dashboard's page and static files carry no data (it signs in with a token from the
# browser), nor does the API's OpenAPI description.
OPEN_ROUTES = frozenset({("GET", "/healthz"), ("GET", "/"), ("GET", "/ui/{file}"),
                         ("GET", "/api/v1/openapi.json")})
# Routes a URL signature (UrlSigner) opens as well as a viewer token.
SIGNED_ROUTES = frozenset({("GET", "/api/v1/artifacts/{sha256}"),
                           ("HEAD", "/api/v1/artifacts/{sha256}")})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    last_used_at REAL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS api_tokens_active_name ON api_tokens (name) WHERE revoked = 0;
CREATE TABLE IF NOT EXISTS api_audit (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    who TEXT NOT NULL,
    role TEXT NOT NULL,
    client_user TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    remote TEXT NOT NULL,
    status INTEGER NOT NULL,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS api_audit_ts ON api_audit (ts);
"""


class TokenError(Exception):
    """A token that cannot be created or revoked, or a database that cannot be opened."""


class Token(msgspec.Struct, frozen=True):
    id: int
    name: str
    role: Role
    created_at: float
    created_by: str
    last_used_at: float | None
    revoked: bool


class AuditEntry(msgspec.Struct, frozen=True):
    ts: float
    who: str
    role: str
    client_user: str
    method: str
    path: str
    remote: str
    status: int
    result: str


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# A recognisable prefix: secret scanners (and the gateway's own redaction) can find a leaked
# token, and a token never starts with "-", which a command line would take for an option.
TOKEN_PREFIX = "llmops_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def allows(role: str, needed: Role) -> bool:
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def required_role(method: str, pattern: str) -> Role | None:
    """The least role for a route; None: open."""
    if (method, pattern) in OPEN_ROUTES:
        return None
    found = ROUTE_ROLES.get((method, pattern))
    if found is not None:
        return found
    return "viewer" if method in ("GET", "HEAD", "OPTIONS") else "admin"


_TOKEN_COLUMNS = "id, name, role, created_at, created_by, last_used_at, revoked"


def _token(row: tuple[Any, ...]) -> Token:
    return Token(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]))


class TokenStore:
    """The tokens and the audit log, in the controller's SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = database.connect(path)
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise TokenError(f"{path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def create(self, name: str, role: Role, by: str, token: str | None = None) -> str:
        """Register a token (a new one unless given); returns it: it is not kept."""
        if role not in ROLES:
            raise TokenError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        if not name or not name.isprintable() or len(name) > 100:
            raise TokenError(f"name {name!r}: expected 1 to 100 printable characters")
        token = token or new_token()
        try:
            with self._db:
                self._db.execute(
                    "INSERT INTO api_tokens (name, role, token_sha256, created_at, created_by)"
                    " VALUES (?, ?, ?, ?, ?)", (name, role, digest(token), time.time(), by))
        except sqlite3.IntegrityError:
            raise TokenError(f"a token named {name!r} exists already (revoke it first)"
                             ) from None
        return token

    def bootstrap(self, token: str) -> bool:
        """Register ``token`` as the admin "bootstrap" (revoking an older one of that name);
        False when it is registered already."""
        with self._db:
            if self._db.execute("SELECT 1 FROM api_tokens WHERE token_sha256 = ?",
                                (digest(token),)).fetchone():
                return False
            self._db.execute("UPDATE api_tokens SET revoked = 1 WHERE name = ? AND revoked = 0",
                             (BOOTSTRAP_NAME,))
        self.create(BOOTSTRAP_NAME, "admin", "bootstrap_token_file", token)
        return True

    def lookup(self, token: str) -> Token | None:
        """The token's record (revoked ones too); marks it used."""
        row = self._db.execute(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE token_sha256 = ?",
                               (digest(token),)).fetchone()
        if row is None:
            return None
        found = _token(row)
        now = time.time()
        if not found.revoked and (found.last_used_at is None
                                  or now - found.last_used_at > LAST_USED_RESOLUTION_S):
            with self._db:
                self._db.execute("UPDATE api_tokens SET last_used_at = ? WHERE id = ?",
                                 (now, found.id))
        return found

    def tokens(self, include_revoked: bool = False) -> list[Token]:
        where = "" if include_revoked else " WHERE revoked = 0"
        rows = self._db.execute(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens{where} ORDER BY id")
        return [_token(r) for r in rows]

    def revoke(self, name: str) -> bool:
        with self._db:
            cursor = self._db.execute(
                "UPDATE api_tokens SET revoked = 1 WHERE name = ? AND revoked = 0", (name,))
        return cursor.rowcount > 0

    def audit(self, entry: AuditEntry) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO api_audit (ts, who, role, client_user, method, path, remote, "
                "status, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.ts, entry.who, entry.role, entry.client_user, entry.method, entry.path,
                 entry.remote, entry.status, entry.result))

    def audit_log(self, since: float | None = None, limit: int = 100) -> list[AuditEntry]:
        """Newest first."""
        rows = self._db.execute(
            "SELECT ts, who, role, client_user, method, path, remote, status, result "
            "FROM api_audit WHERE ts >= ? ORDER BY ts DESC, id DESC LIMIT ?",
            (since if since is not None else 0.0, limit))
        return [AuditEntry(*r) for r in rows]

    def prune(self, before: float) -> int:
        with self._db:
            return self._db.execute("DELETE FROM api_audit WHERE ts < ?", (before,)).rowcount


@dataclass(frozen=True)
class AuthSettings:
    metrics_public: bool = False
    trust_forwarded: bool = False
    signer: UrlSigner | None = None


class UrlSigner:
    """Artifact URLs for one host, signed with the controller's own secret (S3's presigned URLs,
    without an expiry: a replica restarted days later may fetch its artifact again). The URL
    travels only inside a signed command, to that host, over the broker's ACL; a leaked one
    opens that one artifact."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _sig(self, sha256: str, host: str) -> str:
        message = f"artifact|{sha256}|{host}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def query(self, sha256: str, host: str) -> str:
        return urlencode({"host": host, "sig": self._sig(sha256, host)})

    def verify(self, sha256: str, host: str, sig: str) -> bool:
        return hmac.compare_digest(self._sig(sha256, host).encode(),
                                   sig.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class Caller:
    name: str
    role: Role


# The caller's token name, in the request a handler sees.
CALLER: web.RequestKey[str] = web.RequestKey("llmops_caller", str)


def caller_name(request: web.Request) -> str:
    """Who made a request, as the registry and the deployments record it: the token's name;
    in an app built without this middleware (the handlers' own tests), the X-LLMOps-User
    header, at most 200 printable characters."""
    if CALLER in request:
        return request[CALLER]
    raw = request.headers.get(USER_HEADER, "").strip()[:200]
    return "".join(c for c in raw if c.isprintable()) or "anonymous"
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_json = msgspec.json.Encoder()


def _error(status: int, message: str, *, challenge: str | None = None) -> web.Response:
    headers = {}
    if challenge is not None:
        headers["WWW-Authenticate"] = f'Bearer realm="llmops", {challenge}'
    return web.Response(body=_json.encode({"error": message, "status": status}), status=status,
                        content_type="application/json", headers=headers)


def _remote(request: web.Request, settings: AuthSettings) -> str:
    if settings.trust_forwarded:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        if forwarded:
            return forwarded
    return request.remote or ""


def _result(response: web.StreamResponse) -> str:
    if response.status < 400:
        return "ok"
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        try:
            message = msgspec.json.decode(response.body).get("error")
        except (msgspec.DecodeError, AttributeError):
            message = None
        if isinstance(message, str):
            return message[:500]
    return response.reason or str(response.status)


def _authenticate(request: web.Request, tokens: TokenStore) -> Caller | web.Response:
    header = request.headers.get("Authorization")
    if header is None:
        return _error(401, "no token: send 'Authorization: Bearer TOKEN' (llmops --token, "
                      "$LLMOPS_TOKEN or $LLMOPS_TOKEN_FILE)", challenge='error="invalid_request"')
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or " " in value:
        return _error(401, "malformed Authorization header: expected 'Bearer TOKEN'",
                      challenge='error="invalid_request"')
    found = tokens.lookup(value)
    if found is None:
        return _error(401, "unknown token", challenge='error="invalid_token"')
    if found.revoked:
        return _error(401, f"token {found.name!r} is revoked", challenge='error="invalid_token"')
    return Caller(found.name, found.role)


def middleware(tokens: TokenStore, settings: AuthSettings) -> Middleware:
    """Authenticate, authorise, then audit every mutating call (refused ones too)."""

    @web.middleware
    async def auth(request: web.Request, handler: _Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        pattern = route.canonical if route is not None else request.path
        needed = required_role(request.method, pattern)
        if needed == "viewer" and pattern == "/metrics" and settings.metrics_public:
            needed = None
        if (request.method, pattern) in SIGNED_ROUTES and settings.signer is not None \
                and settings.signer.verify(request.match_info.get("sha256", ""),
                                           request.query.get("host", ""),
                                           request.query.get("sig", "")):
            needed = None
        caller: Caller | None = None
        if needed is None:
            response: web.StreamResponse | None = None
        else:
            outcome = _authenticate(request, tokens)
            if isinstance(outcome, web.Response):
                response = outcome
            else:
                caller = outcome
                response = None if allows(caller.role, needed) else _error(
                    403, f"{request.method} {pattern} needs the role {needed!r}; token "
                    f"{caller.name!r} has {caller.role!r}")
        if response is not None:  # refused
            if request.method in MUTATING:
                _audit(request, tokens, settings, caller, response.status, _result(response))
            return response
        if caller is not None:
            request[CALLER] = caller.name  # who the handlers record (caller_name)
        if request.method not in MUTATING:
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _audit(request, tokens, settings, caller, exc.status, exc.reason)
            raise
        except Exception:
            _audit(request, tokens, settings, caller, 500, "internal error")
            raise
        _audit(request, tokens, settings, caller, response.status, _result(response))
        return response

    return auth


def _audit(request: web.Request, tokens: TokenStore, settings: AuthSettings,
           caller: Caller | None, status: int, result: str) -> None:
    user = request.headers.get(USER_HEADER, "").strip()[:200]
    entry = AuditEntry(ts=time.time(), who=caller.name if caller else "",
                       role=caller.role if caller else "", method=request.method,
                       client_user="".join(c for c in user if c.isprintable()),
                       path=request.path_qs[:1000], remote=_remote(request, settings),
                       status=status, result=result)
    try:
        tokens.audit(entry)
    except sqlite3.Error as exc:  # the call itself is done: log it, do not fail it
        log.error("audit_write_failed", error=str(exc), method=entry.method, path=entry.path,
                  who=entry.who, status=status)
    log.info("api_call", who=entry.who, method=entry.method, path=entry.path,
             remote=entry.remote, status=status, result=result)
