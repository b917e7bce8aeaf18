"""What the agent-kill and replica-fault tests read from a running fleet: replica processes
over the whole machine, the deployment's history, the agents' logs, the firing alerts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

from llm_ops_helper.localfleet import LocalFleet

SIM_MODULE = "llm_ops_helper.agent.runtimes.simserver"
MARK = "LLMOPS_FAULT_MARK"
T = TypeVar("T")


def sim_processes(mark: str) -> dict[int, str]:
    """pid -> replica name of every simulator server on this machine carrying the test's
    environment mark, whoever its parent (an orphan counts)."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if SIM_MODULE not in (proc.info["cmdline"] or []):
                continue
            environ = proc.environ()
        except psutil.Error:
            continue
        if environ.get(MARK) == mark:
            found[proc.info["pid"]] = environ.get("LLMOPS_REPLICA", "?")
    return found


async def until(predicate: Callable[[], T | None], timeout_s: float, what: str,
                pause_s: float = 0.2) -> T:
    """The predicate's first truthy value (run off the loop), or AssertionError."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(predicate)
        except OSError as exc:  # the controller restarting, a port not up yet
            last = exc
        else:
            if last:
                found: T = last
                return found
        await asyncio.sleep(pause_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def events(fleet: LocalFleet, deployment: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The deployment's history events, oldest first."""
    found = fleet.get(f"/api/v1/deployments/{deployment}/history?limit=10000")["events"]
    found = sorted(found, key=lambda e: e["ts"])
    return [e for e in found if kind is None or e["kind"] == kind]


def replicas(fleet: LocalFleet, deployment: str) -> list[dict[str, Any]]:
    return list(fleet.get(f"/api/v1/deployments/{deployment}")["replicas"])


def ready_on(fleet: LocalFleet, deployment: str) -> dict[str, str]:
    """Ready replica name -> host, as the controller sees them."""
    return {r["name"]: r["host"] for r in replicas(fleet, deployment) if r["state"] == "ready"}


def alerts(fleet: LocalFleet, state: str = "all") -> list[dict[str, Any]]:
    return list(fleet.get(f"/api/v1/alerts?state={state}&limit=10000")["alerts"])


def host_online(fleet: LocalFleet, host: str) -> bool:
    return bool({h["host"]: h["online"] for h in fleet.get("/api/v1/hosts")["hosts"]}[host])


def log_events(path: Path, event: str, since_line: int = 0) -> list[dict[str, Any]]:
    """The JSON log records named ``event`` in a daemon's log from line ``since_line`` on, in
    order (none while the log does not exist yet)."""
    out = []
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    for line in lines[since_line:]:
        if f'"{event}"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            out.append(record)
    return out


def log_time(record: dict[str, Any]) -> float:
    """A log record's wall time (its ISO 8601 ``timestamp``) in seconds."""
    from datetime import datetime

    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
