"""The demo's narration: one line per thing worth seeing, read from the controller's API.

:class:`Narrator` polls the deployment, its autoscaler decisions and the firing alerts, and
prints what changed: replicas becoming ready, scale-ups and scale-downs with the autoscaler's
reason, alerts firing (the injected fault, an XID on the fault host, among them), and the
load's phase. The line texts
are pure functions of the API's JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import time
from collections.abc import Callable
from typing import Any

from llm_ops_helper.demoload import BASE_RPS, PEAK_RPS, Load, phase_at


def decision_line(d: dict[str, Any]) -> str | None:
    """A line for an applied change of the replica count; None for any other decision."""
    if not d.get("applied") or d["desired"] == d["current"]:
        return None
    way = "up" if d["desired"] > d["current"] else "down"
    return (f"scaled {way}   {d['current']} -> {d['desired']} replicas "
            f"(rule {d['rule']}): {d['reason']}")


def alert_line(a: dict[str, Any]) -> str:
    where = " ".join(x for x in (a.get("host"), None if a.get("gpu") is None
                                 else f"GPU {a['gpu']}", a.get("replica")) if x)
    return f"alert      {a['severity']} {a['rule']} on {where or 'the fleet'}: {a['summary']}"


def is_fault(alert: dict[str, Any], fault_host: str | None) -> bool:
    """The alert the injected fault raises: an XID on the fault host."""
    return fault_host is not None and alert.get("rule") == "gpu_xid" \
        and alert.get("host") == fault_host


class Narrator:
    def __init__(self, get: Callable[[str], Any], deployment: str,
                 print_line: Callable[[str], None], fault_host: str | None = None) -> None:
        self.get, self.deployment, self.fault_host = get, deployment, fault_host
        self.say = print_line
        self.seen_alerts: set[str] = set()
        self.last_decision_ts = 0.0
        self.ready = -1
        self.phase = ""
        self.scaled = {"up": 0, "down": 0}

    def _replicas(self) -> None:
        d = self.get(f"/api/v1/deployments/{self.deployment}")
        ready = sum(1 for r in d.get("replicas", []) if r.get("state") == "ready")
        if ready != self.ready:
            self.ready = ready
            hosts = sorted({r.get("host") or "?" for r in d.get("replicas", [])
                            if r.get("state") == "ready"})
            self.say(f"replicas   {ready}/{d.get('desired', 0)} ready"
                     + (f" on {', '.join(hosts)}" if hosts else ""))

    def _decisions(self) -> None:
        body = self.get(f"/api/v1/deployments/{self.deployment}/decisions?limit=100")
        for d in sorted(body.get("decisions", []), key=lambda d: float(d["ts"])):
            if float(d["ts"]) <= self.last_decision_ts:
                continue
            self.last_decision_ts = float(d["ts"])
            line = decision_line(d)
            if line is not None:
                self.scaled["up" if d["desired"] > d["current"] else "down"] += 1
                self.say(line)

    def _alerts(self) -> None:
        for a in self.get("/api/v1/alerts").get("alerts", []):
            if a["id"] not in self.seen_alerts:
                self.seen_alerts.add(a["id"])
                self.say(("fault injected -> " if is_fault(a, self.fault_host) else "")
                         + alert_line(a))

    def load_phase(self, load: Load, load_started: float) -> None:
        t = time.monotonic() - load_started
        phase = phase_at(t, load.span_s)
        if phase != self.phase:
            self.phase = phase
            rates = {"rising": f"{BASE_RPS:g} -> {PEAK_RPS:g}", "peak": f"{PEAK_RPS:g}",
                     "falling": f"{PEAK_RPS:g} -> {BASE_RPS:g}"}.get(phase, f"{BASE_RPS:g}")
            self.say(f"load       {phase}: {rates} requests/s through the gateway "
                     f"({load.ok} answered, {load.failed} failed so far)")

    async def run(self, stop: asyncio.Event, load: Load | None = None,
                  load_started: float = 0.0) -> None:
        while not stop.is_set():
            for step in (self._decisions, self._replicas, self._alerts):
                # The controller busy or stopping: the next round asks again.
                # A half answer or an unexpected null: the same, not the end of the demo.
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError,
                                         http.client.HTTPException):
                    await asyncio.to_thread(step)
            if load is not None:
                self.load_phase(load, load_started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
