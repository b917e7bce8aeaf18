"""Twenty replicas across four agents with the ``sim`` runtime: placement spreads them, every
one serves, and a scale-down drains them away evenly. Real processes throughout: Mosquitto,
the controller, four agents (simulated GPUs) and twenty simulator servers."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.client import LLMOpsHelper
from llm_ops_helper.localfleet import LocalFleet, openai_chat

pytestmark = pytest.mark.slow


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[LocalFleet]:
    local = LocalFleet(tmp_path / "fleet", agents_count=4, gpus_per_agent=4,
                       gpu_profile="a100-sxm4-80gb")
    async with local:
        yield local


async def test_sim_runtime_serves_20_replicas_across_4_agents(fleet: LocalFleet,
                                                              tmp_path: Path) -> None:
    helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
    card = write_model_card(tmp_path / "sim-7b.toml", startup_s=0.5, itl_ms=2.0)

    deployment = await asyncio.to_thread(helper.deploy_model, str(card), name="sim-7b",
                                         replicas=20, gpu_memory_bytes=16 << 30, timeout=120)
    assert (deployment.ready, deployment.phase) == (20, "available")
    per_host = Counter(r.host for r in deployment.replicas)
    assert sorted(per_host.values()) == [5, 5, 5, 5], per_host
    # One GPU each, 16 GiB on 80 GiB GPUs: at most four replicas share one.
    per_gpu = Counter((r.host, tuple(r.gpus)) for r in deployment.replicas)
    assert all(len(gpus) == 1 for _, gpus in per_gpu) and max(per_gpu.values()) <= 4

    endpoints = helper.endpoints("sim-7b")
    assert len({e.url for e in endpoints}) == 20
    replies = await asyncio.gather(*(asyncio.to_thread(openai_chat, e.url, "sim-7b")
                                     for e in endpoints))
    assert all(r["model"] == "sim-7b" for r in replies)

    deployment = await asyncio.to_thread(helper.scale, "sim-7b", 8, True, timeout=60)
    assert deployment.ready == 8
    for _ in range(300):  # the twelve drained replicas stop and leave the list
        deployment = helper.status("sim-7b")
        if len(deployment.replicas) == 8:
            break
        await asyncio.sleep(0.1)
    per_host = Counter(r.host for r in deployment.replicas)
    assert sorted(per_host.values()) == [2, 2, 2, 2], per_host
    assert len(helper.endpoints("sim-7b")) == 8
