"""The gateway in front of a real fleet: two llama.cpp replicas, the controller telling the
gateway where they are (with an API token), and the ``llmops-gateway`` process between the
client and them: keys, a rate limit, the spread over both replicas, a stream, and a replica
killed under it."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from llm_ops_helper.client import LLMOpsHelper
from llm_ops_helper.localfleet import Daemon, LocalFleet, gateway_toml
from llm_ops_helper.tinymodel import write_tiny_llama
from tests.controller.gateway.harness import free_port
from tests.e2e.test_deploy_llamacpp import NO_CANARY, replica_processes

pytestmark = pytest.mark.slow


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[LocalFleet]:
    local = LocalFleet(tmp_path / "fleet", agents_count=2, gpus_per_agent=2,
                       controller_overrides={"deployments": {"host_lost_grace_s": 120.0}})
    async with local:
        yield local


def gateway_config(fleet: LocalFleet, port: int, state: Path) -> str:
    return gateway_toml(
        fleet.url, port, state, token_file=fleet.token_path,
        keys=[{"name": "app", "key": "sk-app", "models": ["tiny"], "guards": "default"},
              {"name": "trickle", "key": "sk-trickle", "rpm": 1}],
        tables={"limits": {"hold_s": 10.0}, "state": {"flush_s": 0.2},
                "guards.default": {"redact_output": True}})


async def test_gateway_in_front_of_two_llamacpp_replicas(fleet: LocalFleet,
                                                         tmp_path: Path) -> None:
    helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
    model = write_tiny_llama(tmp_path / "tiny.gguf", variant="1")
    deployment = await asyncio.to_thread(helper.deploy_model, str(model), name="tiny",
                                         replicas=2, timeout=120, rollback=NO_CANARY)
    assert deployment.ready == 2
    port = free_port()
    daemon = Daemon("llm_ops_helper.controller.gateway", "gateway", tmp_path / "gw",
                    gateway_config(fleet, port, tmp_path / "gw" / "state"))
    daemon.start()
    url = f"http://127.0.0.1:{port}"
    app = {"Authorization": "Bearer sk-app"}
    body = {"model": "tiny", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hello"}]}
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(30):
                while True:
                    try:
                        async with session.get(url + "/healthz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)

            # Keys: none and a wrong one (a key not allowed the model is in
            # tests/controller/gateway/test_app.py::test_bad_requests_get_openai_errors).
            for headers, status in (({}, 401), ({"Authorization": "Bearer nope"}, 401)):
                async with session.post(url + "/v1/chat/completions", json=body,
                                        headers=headers) as resp:
                    assert resp.status == status
                    assert (await resp.json())["error"]["code"] == "invalid_api_key"

            # Requests spread over both replicas (concurrent: fewest in flight wins).
            async def one() -> str:
                async with session.post(url + "/v1/chat/completions", json=body,
                                        headers=app) as resp:
                    assert resp.status == 200, await resp.text()
                    answer = await resp.json()
                    assert answer["choices"][0]["message"]["role"] == "assistant"
                    return resp.headers["X-LLMOps-Replica"]
            served = Counter(await asyncio.gather(*(one() for _ in range(12))))
            assert len(served) == 2 and min(served.values()) >= 2, served

            # A stream passes through, chunk by chunk, ending with [DONE].
            async with session.post(url + "/v1/chat/completions",
                                    json={**body, "stream": True, "max_tokens": 8},
                                    headers=app) as resp:
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                events = [e async for e in resp.content if e.startswith(b"data:")]
            assert events[-1].strip() == b"data: [DONE]" and len(events) >= 3

            # rpm = 1: the second request within the minute gets 429 and Retry-After.
            trickle = {"Authorization": "Bearer sk-trickle"}
            async with session.post(url + "/v1/chat/completions", json=body,
                                    headers=trickle) as resp:
                assert resp.status == 200
            async with session.post(url + "/v1/chat/completions", json=body,
                                    headers=trickle) as resp:
                assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1

            # One llama.cpp replica killed: every request still answered (the other one).
            victim = next(iter(replica_processes(fleet)))
            os.kill(victim, signal.SIGKILL)
            results = await asyncio.gather(*(one() for _ in range(8)))
            assert len(results) == 8

            async with session.get(url + "/metrics") as resp:
                page = await resp.text()
            assert 'llmops_gateway_requests_total{key="app",model="tiny",status="200"}' in page
    finally:
        assert await daemon.stop() == 0, daemon.log()
    assert "gateway_stopped" in daemon.log()
