"""Broker + controller + three agent processes: the promises of the controller issue.

Everything is real: Mosquitto on a free port, the controller and the agents as child processes
(simulated GPUs, one with a fault scenario), the controller's HTTP API, and a webhook receiver
that speaks HTTP. Only time is compressed: agents send every 0.5 s.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from llm_ops_helper.broker import free_port
from llm_ops_helper.proto import codec
from llm_ops_helper.proto.messages import Alert, Event, Telemetry
from llm_ops_helper.proto.topics import ALERTS
from tests.integration.harness import (
    AgentProcess,
    ControllerProcess,
    Recorder,
    agent_config,
    controller_config,
)

INTERVAL_S = 0.5
SCENARIO = """
[[events]]
at_s = 3
gpu = 1
kind = "temperature_ramp"
to_c = 93
over_s = 1
hold_s = 4

[[events]]
at_s = 3
gpu = 1
kind = "xid"
xid = 79
"""


class WebhookReceiver:
    """An HTTP server that records what is POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def _post(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        return web.Response(text="ok")

    async def __aenter__(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/hook", self._post)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def admin_token(tmp_path: Path) -> dict[str, str]:
    """The controller's [api] section registering a fresh admin token (written to a file)."""
    path = tmp_path / "admin.token"
    path.write_text(secrets.token_urlsafe(32))
    return {"bootstrap_token_file": str(path)}


class Api:
    def __init__(self, port: int, token_file: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {Path(token_file).read_text().strip()}"}

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession(headers=self.headers) as session, \
                session.get(self.base + path) as r:
            return await r.json() if r.content_type == "application/json" else await r.text()

    async def wait_for(self, path: str, predicate: Any, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = await self.get(path)
                if (found := predicate(last)):
                    return found
            except aiohttp.ClientError as exc:
                last = exc
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last}")


def firing(rule: str, host: str, gpu: int | None = None):
    def predicate(body: dict[str, Any]) -> dict[str, Any] | None:
        return next((a for a in body["alerts"] if a["rule"] == rule and a["host"] == host
                     and (gpu is None or a["gpu"] == gpu)), None)
    return predicate


def alerts_on_mqtt(rec: Recorder) -> list[tuple[float, Alert]]:
    """(arrival wall time, alert) for every alert the controller published."""
    return [(at, codec.decode(m.payload, Alert)) for m, at in zip(rec.messages, rec.arrived_at,
                                                                   strict=True)
            if str(m.topic) == ALERTS]


def first_hot(rec: Recorder, host: str, gpu: int, limit_c: float) -> float:
    """The ts of the first snapshot that shows ``gpu`` of ``host`` above ``limit_c``."""
    for m in rec.messages:
        if str(m.topic) == f"llmops/v1/agents/{host}/telemetry":
            t = codec.decode(m.payload, Telemetry)
            if (t.gpus[gpu].temperature_c or 0) > limit_c:
                return t.ts
    raise AssertionError(f"no snapshot of {host} shows GPU {gpu} above {limit_c} C")


def xid_event_ts(rec: Recorder, host: str, xid: int) -> float:
    for m in rec.messages:
        if str(m.topic) == f"llmops/v1/agents/{host}/events":
            e = codec.decode(m.payload, Event)
            if e.kind == "xid" and e.data.get("xid") == xid:
                return e.ts
    raise AssertionError(f"no XID {xid} event from {host}")


@pytest.fixture
async def processes(tmp_path: Path):
    started: list[Any] = []
    yield started
    for process in started:
        await process.close()


async def test_fleet_alerts_offline_and_restart(mosquitto, tmp_path: Path, processes) -> None:
    http_port = free_port()
    async with WebhookReceiver() as hook, Recorder(mosquitto) as rec:
        config = controller_config(
            mosquitto, state_dir=tmp_path / "state", http_port=http_port,
            rules={"xid_hold_s": 3.0, "gpu_temperature_max_c": 85.0},
            state={"dir": str(tmp_path / "state"), "checkpoint_interval_s": 1.0},
            alerts={"webhooks": [{"url": hook.url, "retry_min_s": 0.2}]},
            fleet={"stale_after_intervals": 3.0}, api=admin_token(tmp_path))
        controller = ControllerProcess(tmp_path / "controller", config)
        processes.append(controller)
        controller.start()
        api = Api(http_port, str(tmp_path / "admin.token"))
        await api.wait_for("/healthz", lambda b: isinstance(b, dict) and b["status"] == "ok",
                           10, "the controller's /healthz")

        (tmp_path / "scenario.toml").write_text(SCENARIO)
        agents = {}
        for host in ("gpu-a", "gpu-b", "gpu-c"):
            extra = {"gpus": {"scenario": str(tmp_path / "scenario.toml")}} if host == "gpu-a" \
                else {}
            agents[host] = AgentProcess(tmp_path / host, agent_config(
                mosquitto, host=host, telemetry={"interval_s": INTERVAL_S}, **extra))
            processes.append(agents[host])
        started = time.monotonic()
        for agent in agents.values():
            agent.start()

        # All three hosts online in the API within 5 s.
        await api.wait_for("/api/v1/hosts", lambda b: b["count"] == 3
                           and all(h["online"] and h["gpus"] == 8 for h in b["hosts"]),
                           5.0 + 3.0, "3 online hosts")
        assert time.monotonic() - started < 5.0 + 3.0  # process start-up (imports) included

        # The ramp crosses 85 C and XID 79 fires at t=3 s: both alerts within 3 intervals of
        # the telemetry/event that shows them.
        temp = await api.wait_for("/api/v1/alerts", firing("gpu_temperature_high", "gpu-a", 1),
                                  15, "the temperature alert on gpu-a GPU 1")
        xid = await api.wait_for("/api/v1/alerts", firing("gpu_xid", "gpu-a", 1), 5,
                                 "the XID 79 alert on gpu-a GPU 1")
        assert xid["severity"] == "critical" and "79" in xid["summary"]
        await rec.wait_for(lambda: len(alerts_on_mqtt(rec)) >= 2, 5, "alerts on MQTT")
        fired = {a.rule: (at, a) for at, a in alerts_on_mqtt(rec) if a.state == "firing"}
        at, alert = fired["gpu_temperature_high"]
        assert alert.gpu == 1 and alert.host == "gpu-a" and alert.id == temp["id"]
        assert at - first_hot(rec, "gpu-a", 1, 85.0) <= 3 * INTERVAL_S
        at, alert = fired["gpu_xid"]
        assert at - xid_event_ts(rec, "gpu-a", 79) <= 3 * INTERVAL_S
        # Only gpu-a's GPU 1 is hot: no rule fires for the quiet hosts. (The anomaly detectors
        # may flag what they like on a few seconds of simulated load; they are not rules.)
        all_firing = await api.get("/api/v1/alerts")
        assert {a["host"] for a in all_firing["alerts"] if a["rule"] != "anomaly"} == {"gpu-a"}

        # The scenario ends (the GPU cools, the XID is not repeated): both resolve.
        await api.wait_for("/api/v1/alerts?state=resolved",
                           lambda b: {a["rule"] for a in b["alerts"]} >= {
                               "gpu_temperature_high", "gpu_xid"}, 20,
                           "both alerts resolved")
        still = (await api.get("/api/v1/alerts"))["alerts"]
        assert [a for a in still if a["rule"] != "anomaly"] == []

        # The webhook receiver got them in Alertmanager's webhook format.
        await rec.wait_for(lambda: len(hook.bodies) >= 4, 10, "4 webhook posts")
        body = next(b for b in hook.bodies if b["alerts"][0]["labels"]["alertname"] == "gpu_xid")
        assert body["version"] == "4" and body["status"] == "firing"
        assert body["receiver"] and body["groupLabels"] == {"alertname": "gpu_xid"}
        labels = body["alerts"][0]["labels"]
        assert labels == {"alertname": "gpu_xid", "severity": "critical", "source": "llmops",
                          "host": "gpu-a", "gpu": "1", "series": "xid79"}
        assert body["alerts"][0]["startsAt"].endswith("Z")
        assert body["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"
        resolved = [b for b in hook.bodies if b["status"] == "resolved"]
        assert resolved and not resolved[0]["alerts"][0]["endsAt"].startswith("0001")

        # SIGKILL one agent: offline in the API within 15 s, and an alert fires.
        agents["gpu-c"].signal(signal.SIGKILL)
        killed = time.monotonic()
        await api.wait_for("/api/v1/hosts/gpu-c", lambda b: not b["online"], 15,
                           "gpu-c offline")
        assert time.monotonic() - killed < 15
        offline = await api.wait_for("/api/v1/alerts", firing("host_offline", "gpu-c"), 5,
                                     "the host_offline alert")
        assert offline["severity"] == "critical"

        # Restart the controller: the firing alert and the detectors come back.
        metrics_before = await api.get("/metrics")
        series_before = _metric(metrics_before, "llmops_analytics_series")
        assert series_before > 3 * 8 * 6  # every GPU series of three hosts has a model
        controller.signal(signal.SIGTERM)
        assert await controller.wait(15) == 0
        assert (tmp_path / "state" / "detectors.npz").exists()
        controller = ControllerProcess(tmp_path / "controller2", config)
        processes.append(controller)
        controller.start()
        await api.wait_for("/healthz", lambda b: isinstance(b, dict) and b["status"] == "ok",
                           10, "the restarted controller")
        metrics_after = await api.get("/metrics")
        assert _metric(metrics_after, "llmops_analytics_series") >= series_before
        again = await api.wait_for("/api/v1/alerts", firing("host_offline", "gpu-c"), 5,
                                   "the host_offline alert after the restart")
        assert again["id"] == offline["id"]  # the same firing, not a new one
        history = await api.get("/api/v1/alerts?state=all&limit=100")
        assert {"gpu_temperature_high", "gpu_xid", "host_offline"} <= {
            a["rule"] for a in history["alerts"]}
        await api.wait_for("/api/v1/hosts", lambda b: sum(h["online"] for h in b["hosts"]) == 2,
                           10, "the two live hosts online again")
        assert "Traceback" not in controller.log()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text[:2000]}")


async def test_bad_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    controller = ControllerProcess(tmp_path, '[broker]\nhost = "x"\n[rules]\ntemp = 1\n')
    controller.start()
    assert await controller.wait(20) == 78
    assert "key 'rules.temp': unknown key" in controller.log()


async def test_api_errors_are_json(mosquitto, tmp_path: Path, processes) -> None:
    http_port = free_port()
    controller = ControllerProcess(tmp_path, controller_config(
        mosquitto, state_dir=tmp_path / "state", http_port=http_port,
        api=admin_token(tmp_path)))
    processes.append(controller)
    controller.start()
    api = Api(http_port, str(tmp_path / "admin.token"))
    await api.wait_for("/healthz", lambda b: isinstance(b, dict), 10, "/healthz")
    async with aiohttp.ClientSession(headers=api.headers) as session:
        for path, status, words in [
            ("/api/v1/hosts/nope", 404, "no such host: 'nope'"),
            ("/api/v1/nothing", 404, "no such path: /api/v1/nothing"),
            ("/api/v1/alerts?limit=x", 400, "parameter 'limit': expected an integer"),
            ("/api/v1/alerts?state=open", 400, "parameter 'state': expected one of"),
            ("/api/v1/anomalies?since=yesterday", 400, "parameter 'since'"),
        ]:
            async with session.get(api.base + path) as r:
                body = json.loads(await r.text())
                assert r.status == status, (path, body)
                assert words in body["error"] and body["status"] == status
