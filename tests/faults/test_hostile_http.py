"""Hostile HTTP at every door: malformed requests on every route of the controller's API (as
its live router lists them, through its OpenAPI document) and of the gateway, against the real
processes. Never a 5xx, never a crash, every refusal a JSON error naming its cause, and memory
that does not grow from one round of the same requests to the next."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from llm_ops_helper.localfleet import LocalFleet
from tests.faults.conftest import rss_bytes

GATEWAY_KEY = "sk-fuzz-key"
BAD_PATH_VALUES = ["..", "%2e%2e%2f%2e%2e", "%00", "%ff%fe", "a" * 5000, "ünï", "-1",
                   "99999999999999999999", "NaN", "a%20b", "%2F", "0" * 64, "__proto__",
                   "${x}", "'; DROP TABLE models; --"]
BAD_QUERIES = ["limit=abc", "limit=-1", "limit=1e309", "limit=99999999999999", "since=nan",
               "since=inf", "since=-1e400", "state=bogus", "from=&to=", "limit=1&limit=2",
               "%ff=%fe", "x=" + "y" * 8000, "host=%00", "id=%ff", "tag=no-equals",
               "parameters=-5", "sha256=zz", "runtime=../../x"]
BAD_BODIES: list[tuple[str, bytes]] = [
    ("application/json", b""), ("application/json", b"{"), ("application/json", b"[]"),
    ("application/json", b'"x"'), ("application/json", b"null"), ("application/json", b"NaN"),
    ("application/json", b'{"replicas": "x", "stage": 1, "version": []}'),
    ("application/json", b'{"replicas": 1e400, "version": 99999999999999999999999}'),
    ("application/json", b'{"replicas": -5}'), ("application/json", b"\xff\xfe\x00"),
    ("application/json", b"[" * 50_000 + b"]" * 50_000),
    ("application/json", b'{"a":' * 20_000 + b"1" + b"}" * 20_000),
    ("application/json", b'{"model": "x", "messages": "no", "stream": "yes"}'),
    ("application/json", b'{"model": ' + b'"m' * 1000 + b'"}'),
    ("text/plain", b"hello"), ("application/x-www-form-urlencoded", b"a=1&b=2"),
    ("multipart/form-data; boundary=zz", b"--zz\r\nbroken"),
    ("application/json", b"x" * (30 << 20)),  # 30 MiB
]
TOKENS: list[str | None] = [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer ~!@#",
                            "Bearer " + "A" * 8000, "bearer llmops_not_a_token", "Bearer ü"]
# aiohttp's HTTP parser answers a request line longer than this itself, in plain text, before
# any handler or middleware runs: such a request is held to "no 5xx, no crash" only.
PARSER_LINE_LIMIT = 8000
ALL_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


@pytest.fixture
async def fleet_with_gateway(fleet: LocalFleet) -> LocalFleet:
    fleet.start_gateway({"fuzz": GATEWAY_KEY})
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(fleet.gateway_url + "/healthz") as response:
                    if response.status in (200, 503):
                        break
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, "the gateway did not start"
            await asyncio.sleep(0.2)
    return fleet


def concrete(template: str, value: str) -> str:
    return re.sub(r"\{[^}/]+\}", lambda _: value, template)


def cases(paths: dict[str, Any], admin: str) -> Iterator[tuple[str, str, dict[str, str], bytes]]:
    """(method, path and query, headers, body): every route broken every way listed above."""
    auth = {"Authorization": f"Bearer {admin}"}
    for template, operations in paths.items():
        methods = [m.upper() for m in operations if m.upper() in ALL_METHODS]
        plain = concrete(template, "fuzz")
        for method in ALL_METHODS:  # the wrong ones too
            yield method, plain, auth, b""
        for method in methods:
            for token in TOKENS:
                headers = {} if token is None else {"Authorization": token}
                yield method, plain, headers, b""
            for value in BAD_PATH_VALUES:
                yield method, concrete(template, value), auth, b""
            for query in BAD_QUERIES:
                yield method, f"{plain}?{query}", auth, b""
            yield method, plain, {**auth, "Content-Type": "junk/;;;==", "X-Forwarded-For": "%%%",
                                  "Range": "bytes=999999999999-1", "If-None-Match": "\"" * 50,
                                  "Accept": "*/*;q=nan"}, b""
            if method in ("POST", "PUT", "PATCH"):
                for content_type, body in BAD_BODIES:
                    yield method, plain, {**auth, "Content-Type": content_type}, body


def is_json_error(status: int, body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):  # the gateway's OpenAI shape
        error = error.get("message")
    return isinstance(error, str) and bool(error.strip())


async def run_round(base: str, requests: list[tuple[str, str, dict[str, str], bytes]]
                    ) -> tuple[Counter[int], list[str]]:
    """Send every request; the statuses, and every answer that broke the promise."""
    statuses: Counter[int] = Counter()
    broken: list[str] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for method, path, headers, body in requests:
            where = f"{method} {path[:120]} {list(headers)} body={body[:40]!r}"
            try:
                async with session.request(method, base + path, headers=headers, data=body,
                                           skip_auto_headers=["Content-Type"]) as response:
                    statuses[response.status] += 1
                    if response.content_type == "text/event-stream":
                        response.close()  # its connection is never reused
                        continue  # a stream opened with a valid token: not an error
                    text = await response.read()
                    if response.status >= 500:
                        broken.append(f"{where} -> {response.status} {text[:200]!r}")
                    elif (response.status >= 400 and method != "HEAD"
                          and len(path) <= PARSER_LINE_LIMIT
                          and not is_json_error(response.status, text)):
                        broken.append(f"{where} -> {response.status} not a JSON error: "
                                      f"{text[:200]!r}")
            except (aiohttp.ClientConnectionError, aiohttp.InvalidURL) as exc:
                if isinstance(exc, aiohttp.ServerDisconnectedError) or "reset" in str(exc):
                    statuses[0] += 1  # the server hung up (a 30 MiB body): it must still live
                else:
                    raise
    return statuses, broken


async def test_every_api_and_gateway_route_refuses_malformed_requests_with_json_and_no_5xx(
        fleet_with_gateway: LocalFleet) -> None:
    """Every route of the controller (from its live OpenAPI document) and of the gateway gets
    wrong methods, missing and garbage tokens, bad path and query parameters, bad and huge
    bodies and junk headers, twice: no answer is a 5xx, every 4xx is a JSON error with a
    message, both processes live on, and the controller's RSS after the second round is within
    10 % of its RSS after the first (the same requests again must not cost more memory)."""
    fleet = fleet_with_gateway
    assert fleet.controller is not None and fleet.gateway is not None
    async with aiohttp.ClientSession() as session, \
            session.get(fleet.url + "/api/v1/openapi.json") as response:
        paths = (await response.json())["paths"]
    controller_requests = list(cases(paths, fleet.token))
    gateway_paths = {"/v1/chat/completions": {"post": {}}, "/v1/completions": {"post": {}},
                     "/v1/models": {"get": {}}, "/healthz": {"get": {}},
                     "/metrics": {"get": {}}}
    gateway_requests = list(cases(gateway_paths, GATEWAY_KEY))
    rss: list[int] = []
    started = time.monotonic()
    for _ in range(2):
        c_status, c_broken = await run_round(fleet.url, controller_requests)
        g_status, g_broken = await run_round(fleet.gateway_url, gateway_requests)
        assert fleet.controller.running and fleet.gateway.running
        assert not c_broken, "\n".join(c_broken[:40])
        assert not g_broken, "\n".join(g_broken[:40])
        rss.append(rss_bytes(fleet.controller.pid))
    print(f"\n{len(paths)} controller paths, {len(controller_requests)} + "
          f"{len(gateway_requests)} requests a round in {time.monotonic() - started:.1f} s; "
          f"controller {dict(c_status)}; gateway {dict(g_status)}; "
          f"controller RSS {rss[0] / 2**20:.1f} -> {rss[1] / 2**20:.1f} MiB")
    assert rss[1] <= rss[0] * 1.10, rss
