"""Which replica serves a model: the controller's ready endpoints, polled, and a pick.

A model name is a deployment name, or one of its version refs (``tiny@2``: only that
version's replicas). A pick is the ready replica with the fewest requests in flight through
this gateway, ties taken in turn; a replica that refused a connection is *suspect* for a few
seconds and picked only when nothing else is left.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

log = structlog.get_logger("llmops.gateway.routing")


@dataclass(slots=True, eq=False)
class Replica:
    name: str
    url: str
    version: str
    in_flight: int = 0
    suspect_until: float = 0.0
    served: int = field(default=0)


@dataclass(frozen=True, slots=True)
class Route:
    """What a model name resolves to: the deployment, and a version filter (None: any)."""

    deployment: str
    version: str | None = None


def pick(replicas: Iterable[Replica], now: float, turn: int,
         exclude: frozenset[str] = frozenset()) -> Replica | None:
    """The replica with the fewest in flight, healthy ones first; ties broken by ``turn``."""
    candidates = [r for r in replicas if r.name not in exclude]
    if not candidates:
        return None
    healthy = [r for r in candidates if r.suspect_until <= now] or candidates
    least = min(r.in_flight for r in healthy)
    tied = [r for r in healthy if r.in_flight == least]
    return tied[turn % len(tied)]


class Router:
    """The controller's view of deployments and ready replicas, refreshed every ``refresh_s``."""

    def __init__(self, session: aiohttp.ClientSession, controller_url: str, token: str | None,
                 *, refresh_s: float, suspect_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.session, self.url = session, controller_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.refresh_s, self.suspect_s, self.clock = refresh_s, suspect_s, clock
        self.replicas: dict[str, list[Replica]] = {}  # deployment -> its ready replicas
        self._by_name: dict[str, Replica] = {}
        self._turn = itertools.count()
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self.refreshed = 0

    # -- the controller's view -----------------------------------------------------------------

    async def _get(self, path: str) -> Any:
        async with self.session.get(self.url + path, headers=self.headers,
                                    timeout=aiohttp.ClientTimeout(total=10)) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def refresh(self) -> None:
        listing = await self._get("/api/v1/deployments")
        names = [d["name"] for d in listing["deployments"]]
        found = await asyncio.gather(*(self._get(f"/api/v1/deployments/{n}/endpoints")
                                       for n in names), return_exceptions=True)
        replicas: dict[str, list[Replica]] = {}
        by_name: dict[str, Replica] = {}
        for name, answer in zip(names, found, strict=True):
            old = self.replicas.get(name, [])
            if isinstance(answer, BaseException):  # deleted meanwhile; keep what we knew
                if isinstance(answer, aiohttp.ClientResponseError) and answer.status == 404:
                    continue
                replicas[name] = old
                by_name.update((r.name, r) for r in old)
                continue
            replicas[name] = []
            for e in answer["endpoints"]:
                replica = self._by_name.get(e["replica"])
                if replica is None or replica.url != e["url"]:
                    replica = Replica(e["replica"], e["url"].rstrip("/"), e["version"])
                replica.version = e["version"]
                replicas[name].append(replica)
                by_name[replica.name] = replica
        self.replicas, self._by_name = replicas, by_name
        self.refreshed += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh()
            except (aiohttp.ClientError, TimeoutError, KeyError, TypeError, ValueError) as exc:
                log.warning("controller_unreachable", error=str(exc) or type(exc).__name__)
            self._wake.clear()
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            await asyncio.wait(waits, timeout=self.refresh_s,
                               return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()

    # -- lookups -------------------------------------------------------------------------------

    def resolve(self, model: str) -> Route | None:
        if model in self.replicas:
            return Route(model)
        name, at, _ = model.partition("@")
        if at and name in self.replicas:
            return Route(name, model)
        return None

    def models(self) -> list[str]:
        return sorted(self.replicas)

    def choose(self, route: Route, exclude: frozenset[str] = frozenset()) -> Replica | None:
        replicas = self.replicas.get(route.deployment, [])
        if route.version is not None:
            replicas = [r for r in replicas if r.version == route.version]
        return pick(replicas, self.clock(), next(self._turn), exclude)

    async def wait_for(self, route: Route, hold_s: float,
                       exclude: frozenset[str] = frozenset()) -> Replica | None:
        """A replica for ``route``, waiting up to ``hold_s`` (a deployment scaling up from zero)
        and asking for a refresh meanwhile; None when none came."""
        deadline = self.clock() + hold_s
        while (replica := self.choose(route, exclude)) is None:
            left = deadline - self.clock()
            if left <= 0:
                return None
            changed = self._changed
            self._wake.set()
            try:
                async with asyncio.timeout(min(left, self.refresh_s)):
                    await changed.wait()
            except TimeoutError:
                pass
        return replica

    def suspect(self, replica: Replica) -> None:
        replica.suspect_until = self.clock() + self.suspect_s
        log.warning("replica_suspect", replica=replica.name, url=replica.url,
                    for_s=self.suspect_s)
