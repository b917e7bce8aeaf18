"""The read API and /metrics over real HTTP (aiohttp's test server on a local port)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from llm_ops_helper.controller.api import build_app
from llm_ops_helper.controller.config import parse
from llm_ops_helper.controller.state import ControllerState, build_state
from llm_ops_helper.proto.codec import encode
from tests.controller.fixtures import gpu, status, telemetry


@pytest.fixture
async def api(tmp_path: Path):
    state = build_state(parse(f'[broker]\nhost = "x"\n[state]\ndir = "{tmp_path}"\n'
                              '[detection]\nalert_after_samples = 100\n'
                              # 201 snapshots fed at once: past the default burst of 200 the
                              # last one waited for the bucket to refill (50 ms), a race.
                              '[fleet]\nburst = 1000\n', "c.toml"))
    token = state.tokens.create("test-admin", "admin", "test")
    client = TestClient(TestServer(build_app(state)),
                        headers={"Authorization": f"Bearer {token}"})
    await client.start_server()
    client.state = state  # type: ignore[attr-defined]
    yield client
    await client.close()
    state.store.close()


START = time.time() - 1000.0


def feed(state: ControllerState, host: str, temps: list[float]) -> None:
    for n, temp in enumerate(temps):
        t = telemetry(host=host, seq=n + 1, ts=START + n, gpus=[gpu(0, temperature_c=temp)])
        state.ingest.handle(f"llmops/v1/agents/{host}/telemetry", encode(t))
        assert state.analytics is not None
        detections, holds = state.analytics.flush()
        state.record(detections)
        for condition, at, until in holds:
            state.alerts.hold(condition, until, at)
    state.alerts.commit()


async def test_hosts_host_alerts_and_anomalies(api: TestClient) -> None:
    state: ControllerState = api.state  # type: ignore[attr-defined]
    rng = random.Random(1)
    feed(state, "gpu-1", [60 + rng.gauss(0, 0.3) for _ in range(200)] + [95.0])
    state.ingest.handle("llmops/v1/agents/gpu-2/status", encode(status(host="gpu-2", ts=START)))
    state.ingest.handle("llmops/v1/agents/gpu-2/status", encode(
        status(host="gpu-2", state="offline", reason="shutdown", ts=START)))
    state.alerts.commit()

    hosts = await (await api.get("/api/v1/hosts")).json()
    assert [(h["host"], h["online"], h["offline_reason"]) for h in hosts["hosts"]] == [
        ("gpu-1", True, None), ("gpu-2", False, "shutdown")]
    online = await (await api.get("/api/v1/hosts?state=online")).json()
    assert online["count"] == 1

    one = await (await api.get("/api/v1/hosts/gpu-1")).json()
    assert one["telemetry"]["gpus"][0]["temperature_c"] == 95.0
    assert one["seq_missing"] == 0 and one["gpus"] == 1

    alerts = await (await api.get("/api/v1/alerts")).json()
    rules = {a["rule"] for a in alerts["alerts"]}
    assert {"gpu_temperature_high", "anomaly"} <= rules

    anomalies = await (await api.get("/api/v1/anomalies?host=gpu-1")).json()
    hot = [a for a in anomalies["anomalies"] if a["series"] == "temperature_c"]
    assert hot and hot[0]["value"] == 95.0 and hot[0]["gpu"] == 0
    assert hot[0]["feature"] and "expected about" in hot[0]["summary"]
    later = await (await api.get(f"/api/v1/anomalies?since={START + 5000}")).json()
    assert later == {"anomalies": [], "count": 0}


async def test_metrics_is_valid_prometheus_text_with_fleet_and_ingest_figures(
        api: TestClient) -> None:
    state: ControllerState = api.state  # type: ignore[attr-defined]
    feed(state, "gpu-1", [60.0, 61.0])
    state.ingest.handle("llmops/v1/agents/gpu-1/telemetry", b"{oops")
    state.ingest.handle("llmops/v1/agents/gpu-1/status", encode(msgspec.structs.replace(
        status("gpu-1", ts=time.time()), runtimes=["sim"])))
    upload = await api.post("/api/v1/models/m/versions?filename=m.toml", data=b"[sim]\n")
    assert upload.status == 201, await upload.text()
    deploy = await api.put("/api/v1/deployments/chat",
                           json={"model": "m@1", "replicas": 3, "gpus_per_replica": 0})
    assert deploy.status == 201, await deploy.text()
    response = await api.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("llmops_ingest_messages_total", (("kind", "telemetry"),))] == 2
    assert samples[("llmops_ingest_dropped_total", (("reason", "not_json"),))] == 1
    assert samples[("llmops_ingest_dropped_total", (("reason", "rate_limited"),))] == 0
    assert samples[("llmops_fleet_hosts", (("state", "online"),))] == 1
    assert samples[("llmops_host_up", (("host", "gpu-1"),))] == 1
    assert samples[("llmops_fleet_gpus", (("state", "healthy"),))] == 1
    assert samples[("llmops_fleet_gpu_temperature_max_celsius", ())] == 61.0
    assert samples[("llmops_analytics_samples_total", ())] > 0
    assert samples[("llmops_deployment_replicas_desired", (("deployment", "chat"),))] == 3
    assert samples[("llmops_deployment_replicas_ready", (("deployment", "chat"),))] == 0
    assert samples[("llmops_deployment_phase", (("deployment", "chat"),
                                                ("phase", "progressing")))] == 1
    assert samples[("llmops_broker_commands_expired_total", ())] == 0
