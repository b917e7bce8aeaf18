"""``GET /api/v1/overview``: the whole fleet on one page, what the dashboard and ``llmops top``
draw every second.

:func:`overview` is a plain function of the controller's in-memory state: hosts and their
GPUs (from the latest telemetry, else the inventory in the retained status), the deployments as
the deployments engine shows them, and the firing alerts. A GPU's ``health`` folds the alerts
that name it into one colour: ``critical`` when a critical alert names it or the agent reports
it unhealthy, ``warning`` when a warning does, else ``ok``.

:class:`OverviewCache` builds its JSON at most once a second however many clients ask (and the
live stream's feed refreshes it every tick), and a request finding it a second old gets it as
it is while the rebuild runs after: for 2,000 hosts it is ~5 MB, and building it for every
request on the loop that ingests is what made API answers wait (tests/faults/test_load.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from aiohttp import web

from llm_ops_helper.controller.fleet import HostState
from llm_ops_helper.controller.state import ControllerState
from llm_ops_helper.proto.messages import Alert, GpuInfo, GpuSample

Health = Literal["ok", "warning", "critical"]


def gpu_health(healthy: bool, severities: Iterable[str]) -> Health:
    found = set(severities)
    if not healthy or "critical" in found:
        return "critical"
    return "warning" if "warning" in found else "ok"


def _gpu(g: GpuInfo | GpuSample, severities: list[str]) -> dict[str, Any]:
    """A GPU from its latest sample, or from the inventory alone (no readings yet)."""
    sample = g if isinstance(g, GpuSample) else None
    healthy = sample.healthy if sample is not None else True
    return {"index": g.index, "name": g.name, "uuid": g.uuid, "healthy": healthy,
            "error": sample.error if sample is not None else None,
            "util_pct": sample.utilization_gpu_pct if sample is not None else None,
            "memory_used_bytes": sample.memory_used_bytes if sample is not None else None,
            "memory_total_bytes": g.memory_total_bytes,
            "temperature_c": sample.temperature_c if sample is not None else None,
            "power_w": sample.power_w if sample is not None else None,
            "power_limit_w": sample.power_limit_w if sample is not None else None,
            "health": gpu_health(healthy, severities)}


def _host(s: HostState, mine: list[Alert]) -> dict[str, Any]:
    """A host and its GPUs; ``mine``: the firing alerts that name this host."""
    by_gpu: dict[int, list[str]] = {}
    for a in mine:
        if a.gpu is not None:
            by_gpu.setdefault(a.gpu, []).append(a.severity)
    t = s.telemetry
    # No sample yet: the inventory of the retained status.
    known: Sequence[GpuInfo | GpuSample] = (
        t.gpus if t is not None else s.status.gpus if s.status is not None else [])
    gpus = [_gpu(g, by_gpu.get(g.index, [])) for g in sorted(known, key=lambda g: g.index)]
    m = t.host_metrics if t is not None else None
    return {
        "host": s.host, "online": s.online, "offline_reason": s.offline_reason,
        "since": s.since, "last_ts": t.ts if t is not None else None,
        "agent_version": (s.status.agent_version or None) if s.status is not None else None,
        "cpu_pct": m.cpu_pct if m is not None else None,
        "memory_used_pct": (100.0 * m.memory_used_bytes / m.memory_total_bytes
                            if m is not None and m.memory_total_bytes else None),
        "alerts": len(mine), "gpus": gpus,
    }


def version_number(ref: str | None) -> int | None:
    """``"chat@3"`` -> 3; None for anything else."""
    number = ref.rpartition("@")[2] if ref else ""
    return int(number) if number.isascii() and number.isdigit() else None


def _deployment(view: dict[str, Any]) -> dict[str, Any]:
    spec = view.get("spec") or {}
    autoscale = spec.get("autoscale") or {}
    ref = view.get("version")
    model = ref.rpartition("@")[0] if ref and "@" in ref else spec.get("model", "")
    return {
        "name": view["name"], "model": model, "version": version_number(ref),
        "ref": ref, "requested": view.get("requested"),
        # Where a plain rollback goes, in full: it may be a version of another model.
        "previous_ref": view.get("previous_version"),
        "previous_version": version_number(view.get("previous_version")),
        "runtime": view.get("runtime"),
        "replicas_desired": view["desired"], "replicas_ready": view["ready"],
        "phase": view["phase"], "message": view.get("message"),
        "autoscale_mode": autoscale.get("mode", "off"),
        "replicas": [{"name": r["name"], "host": r["host"], "state": r["state"],
                      "reason": r["reason"], "version": version_number(r["version"]),
                      "gpus": list(r["gpus"]),
                      "url": r["url"], "phase": r["phase"]} for r in view["replicas"]],
    }


def _alert(a: Alert) -> dict[str, Any]:
    return {"id": a.id, "rule": a.rule, "severity": a.severity, "host": a.host, "gpu": a.gpu,
            "replica": a.replica, "summary": a.summary, "started_at": a.started_at}


_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def overview(state: ControllerState, now: float | None = None) -> dict[str, Any]:
    firing = sorted(state.alerts.firing.values(),
                    key=lambda a: (_SEVERITY_ORDER.get(a.severity, 3), -(a.started_at or a.ts)))
    by_host: dict[str, list[Alert]] = {}
    for a in firing:
        if a.host is not None:
            by_host.setdefault(a.host, []).append(a)
    hosts = [_host(s, by_host.get(s.host, []))
             for s in sorted(state.fleet.hosts.values(), key=lambda s: s.host)]
    return {
        "ts": time.time() if now is None else now,
        "hosts": hosts,
        "deployments": [_deployment(v) for v in state.deployments.list_views()],
        "alerts": [_alert(a) for a in firing],
    }


_json = msgspec.json.Encoder()
MAX_AGE_S = 1.0
MAX_STALE_S = 5.0


@dataclass(eq=False)
class OverviewCache:
    """The overview as JSON bytes. Older than ``max_age_s``, it is still served while a rebuild
    is scheduled right after (so no request waits for a build of 5 MB); older than
    ``max_stale_s`` (nobody asked for a while), it is built before answering."""

    state: ControllerState
    max_age_s: float = MAX_AGE_S
    max_stale_s: float = MAX_STALE_S
    clock: Callable[[], float] = time.monotonic
    _built_at: float = field(default=-math.inf, repr=False)
    _body: bytes = field(default=b"", repr=False)
    _scheduled: bool = field(default=False, repr=False)

    def json(self) -> bytes:
        age = self.clock() - self._built_at
        if age >= self.max_stale_s:
            self.refresh()
        elif age >= self.max_age_s and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._rebuild)
        return self._body

    def _rebuild(self) -> None:
        self._scheduled = False
        if self.clock() - self._built_at >= self.max_age_s:  # the feed may have done it
            self.refresh()

    def refresh(self) -> bytes:
        self._body = _json.encode(overview(self.state))
        self._built_at = self.clock()
        return self._body


STATE: web.AppKey[ControllerState] = web.AppKey("dashboard_state", ControllerState)
CACHE: web.AppKey[OverviewCache] = web.AppKey("dashboard_overview", OverviewCache)


async def get_overview(request: web.Request) -> web.Response:
    return web.Response(body=request.app[CACHE].json(), content_type="application/json")
