"""What monitoring sees decides a rollout, and bad input is refused with its cause named.

Real processes: Mosquitto, the controller, two agents and ``sim`` replicas (the project's
vLLM-compatible simulator, which has vLLM's latency histograms and counters); the client is
the SDK and the CLI over the controller's API.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llm_ops_helper import cli
from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.client import DeploymentFailed, LLMOpsHelper
from llm_ops_helper.localfleet import LocalFleet
from tests.e2e.clients import Client

pytestmark = pytest.mark.slow

CANARY = {"observe_s": 4.0, "min_requests": 10}


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[LocalFleet]:
    local = LocalFleet(tmp_path / "fleet", agents_count=2, gpus_per_agent=2)
    async with local:
        yield local


async def test_a_slower_version_is_rolled_back_once_monitoring_sees_it(
        fleet: LocalFleet, tmp_path: Path) -> None:
    helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
    fast = write_model_card(tmp_path / "chat-v1.toml", ttft_base_ms=5.0, itl_ms=1.0)
    deployment = await asyncio.to_thread(helper.deploy_model, str(fast), name="chat",
                                         replicas=2, timeout=60)
    assert deployment.version == "chat@1"

    slow = write_model_card(tmp_path / "chat-v2.toml", ttft_base_ms=150.0, itl_ms=1.0)
    with Client(helper, "chat") as client:
        with pytest.raises(DeploymentFailed) as failed:
            await asyncio.to_thread(helper.deploy_model, str(slow), name="chat", replicas=2,
                                    timeout=60, rollback=CANARY)
        deployment = await asyncio.to_thread(helper.wait, "chat", "chat@1", timeout=60,
                                             rolling_back=True)
    assert "mean time to first token" in str(failed.value), str(failed.value)
    assert deployment.version == "chat@1" and deployment.ready == 2
    assert client.failures == []
    assert client.ok["chat@2"] > 0, "the canary served before it was judged"
    history = fleet.get("/api/v1/deployments/chat/history")
    rollback = [e for e in history["events"] if e["kind"] == "rollback_started"]
    assert rollback and "chat@2" in rollback[-1]["message"]

    # A version that answers half its requests with a 500: its error rate (the server's own
    # http_requests_total{status="5xx"}, as vLLM exports it) gives it away.
    failing = write_model_card(tmp_path / "chat-v3.toml", ttft_base_ms=5.0, itl_ms=1.0,
                               error_rate=0.5)
    with Client(helper, "chat") as client:
        with pytest.raises(DeploymentFailed) as failed:
            await asyncio.to_thread(helper.deploy_model, str(failing), name="chat", replicas=2,
                                    timeout=60, rollback=CANARY)
        deployment = await asyncio.to_thread(helper.wait, "chat", "chat@1", timeout=60,
                                             rolling_back=True)
    assert "error rate" in str(failed.value) and "chat@3" in str(failed.value)
    assert deployment.version == "chat@1" and deployment.ready == 2
    assert client.failures and all("(chat@3)" in f for f in client.failures)


async def test_bad_input_is_refused_naming_its_cause(fleet: LocalFleet, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    url = ["--url", fleet.url, "--token", fleet.token]
    card = write_model_card(tmp_path / "m.toml")

    # A missing model file: refused before anything is sent.
    assert cli.main([*url, "deploy", str(tmp_path / "nope.gguf")]) == 1
    assert "nope.gguf" in capsys.readouterr().err

    # An unknown runtime.
    assert cli.main([*url, "models", "push", str(card), "--runtime", "tensorrt"]) == 1
    err = capsys.readouterr().err
    assert "tensorrt" in err and "sim" in err

    # More GPU memory than any host has (simulated A10G: 24 GB).
    assert cli.main([*url, "deploy", str(card), "--name", "huge", "--gpu-memory", "40GiB",
                     "--no-wait"]) == 1
    err = capsys.readouterr().err
    assert "40.0 GiB" in err and "largest" in err, err
    assert "huge@1, uploaded for this deployment, was retired" in err
    helper = LLMOpsHelper(fleet.url, token=fleet.token)
    # Nothing half-done stays behind: no deployment, and the upload retired (its blob gone).
    assert [d.name for d in helper.status()] == []
    assert [v.stage for v in helper.get_model("huge").versions] == ["retired"]

    # An illegal lifecycle transition.
    version = helper.push_model(str(card), "m")
    assert cli.main([*url, "models", "promote", "m", str(version.version)]) == 1
    err = capsys.readouterr().err
    assert "registered" in err and "production" in err and "staging" in err, err

    # A checksum mismatch on upload: the controller keeps nothing.
    models_before = [m.name for m in helper.list_models()]
    request = urllib.request.Request(
        f"{fleet.url}/api/v1/models/m/versions?sha256={'0' * 64}&filename=m.toml",
        data=card.read_bytes(), method="POST",
        headers={"Content-Type": "application/octet-stream",
                 "Authorization": f"Bearer {fleet.token}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
    assert caught.value.code == 400
    assert "checksum mismatch" in caught.value.read().decode()
    assert [m.name for m in helper.list_models()] == models_before
    assert [v.version for v in helper.get_model("m").versions] == [version.version]
