"""From a model file to serving replicas, with updates and rollback: the deployment issue's
promise, end to end with real processes.

Mosquitto, the controller and two agents (simulated GPUs) run as real processes; the replicas
are real llama.cpp servers (llama.cpp's own C++ server through the xllamacpp wheel, on CPU)
serving a tiny random-weight llama model generated for the test. The client is the SDK
(``LLMOpsHelper``) and the ``llmops`` CLI, over the controller's HTTP API.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from llm_ops_helper import cli
from llm_ops_helper.client import DeploymentFailed, LLMOpsHelper
from llm_ops_helper.localfleet import LocalFleet, openai_chat
from llm_ops_helper.tinymodel import write_broken_gguf, write_tiny_llama
from tests.e2e.clients import Client, settled

pytestmark = pytest.mark.slow

# llama.cpp's server exports no latency histograms, so there is nothing for a metric canary to
# compare: roll straight through (the canary is exercised on the sim runtime, which has them).
NO_CANARY = {"observe_s": 0}


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[LocalFleet]:
    local = LocalFleet(tmp_path / "fleet", agents_count=2, gpus_per_agent=2,
                       controller_overrides={"deployments": {"host_lost_grace_s": 120.0}})
    async with local:
        yield local


def replica_processes(fleet: LocalFleet) -> dict[int, str]:
    """pid -> command line of every llama.cpp replica process of this fleet (their model
    files live in the agents' caches, under the fleet's work directory)."""
    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if "llamacpp_server" in cmdline and str(fleet.workdir) in cmdline:
            out[p.info["pid"]] = cmdline
    return out


async def test_deploy_update_rollback_and_agent_restart(fleet: LocalFleet,
                                                        tmp_path: Path) -> None:
    helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
    v1 = write_tiny_llama(tmp_path / "tiny.gguf", variant="1")

    # 1. deploy_model returns once both replicas answer.
    deployment = await asyncio.to_thread(helper.deploy_model, str(v1), name="tiny",
                                         replicas=2, timeout=120,
                                         rollback=NO_CANARY)
    assert (deployment.version, deployment.ready, deployment.phase) == ("tiny@1", 2, "available")
    hosts = {r.host for r in deployment.replicas if r.state == "ready"}
    assert hosts == {a.host for a in fleet.agents}, "replicas spread over both agents"
    for endpoint in helper.endpoints("tiny"):
        reply = await asyncio.to_thread(openai_chat, endpoint.url, "tiny")
        assert reply["choices"][0]["message"]["role"] == "assistant"

    # 2. A second version rolls out while a client sends requests: none fails.
    v2 = write_tiny_llama(tmp_path / "tiny-v2.gguf", variant="2")
    with Client(helper, "tiny") as client:
        await asyncio.sleep(1.0)
        deployment = await asyncio.to_thread(helper.deploy_model, str(v2), name="tiny",
                                             replicas=2, timeout=120,
                                         rollback=NO_CANARY)
        await asyncio.sleep(1.0)
    assert deployment.version == "tiny@2" and deployment.ready == 2
    assert client.failures == []
    assert client.ok["tiny@1"] > 0 and client.ok["tiny@2"] > 0, client.ok

    # 3. A third version whose server exits at start is rolled back by itself.
    broken = write_broken_gguf(tmp_path / "tiny-v3.gguf")
    with pytest.raises(DeploymentFailed) as failed:
        await asyncio.to_thread(helper.deploy_model, str(broken), name="tiny", replicas=2,
                                timeout=120, rollback=NO_CANARY)
    assert "tiny@3" in str(failed.value)
    deployment = await asyncio.to_thread(helper.wait, "tiny", "tiny@2", timeout=60,
                                         rolling_back=True)
    assert (deployment.version, deployment.ready, deployment.phase) == ("tiny@2", 2, "available")
    assert {e.version for e in helper.endpoints("tiny")} == {"tiny@2"}

    # 4. `llmops rollback` returns to the version before.
    code = await asyncio.to_thread(cli.main, ["--url", fleet.url, "--token", fleet.token, "rollback", "tiny",
                                              "--timeout", "120"])
    assert code == 0
    deployment = await settled(helper, "tiny", 2)
    assert (deployment.version, deployment.ready) == ("tiny@1", 2)

    # 5. An agent killed with SIGKILL and started again keeps exactly its replicas.
    agent = fleet.agents[0]
    before = replica_processes(fleet)
    mine = {r.name for r in deployment.replicas if r.host == agent.host}
    assert len(before) == 2 and len(mine) == 1
    agent.daemon.signal(signal.SIGKILL)
    await agent.daemon.wait(10)
    assert replica_processes(fleet) == before, "replicas outlive their agent"
    agent.daemon.start()
    await fleet.wait_ready(30)
    await asyncio.sleep(3.0)  # several telemetry intervals and reconcile passes
    deployment = await asyncio.to_thread(helper.wait, "tiny", "tiny@1", timeout=60)
    assert replica_processes(fleet) == before, "adopted, not restarted nor duplicated"
    assert {r.name for r in deployment.replicas if r.host == agent.host} == mine
    assert deployment.ready == 2

    # And stopping the fleet leaves no replica behind.
    await fleet.stop()
    assert replica_processes(fleet) == {}
