"""The agent daemon (in this process, real Mosquitto) deploys a replica on a signed command."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from llm_ops_helper.agent.config import ConfigError, parse
from llm_ops_helper.agent.wiring import build_agent
from llm_ops_helper.proto.codec import encode
from llm_ops_helper.proto.messages import CommandResult, Event, Status, Telemetry
from llm_ops_helper.proto.signing import sign_command
from tests.agent.replicas.helpers import RUNTIMES, replica_processes
from tests.integration.harness import Recorder, agent_config, publish

KEY = b"replica-commands-secret"


async def test_signed_deploy_replica_runs_it_and_telemetry_reports_it_ready(
        mosquitto, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    low = random.randrange(21000, 29000, 100)
    (tmp_path / "agent.key").write_bytes(KEY)
    text = agent_config(mosquitto, host="gpu-sup", gpus={"simulated_count": 2},
                        supervisor={"state_dir": str(state_dir), "bind_host": "127.0.0.1",
                                    "advertise_host": "127.0.0.1",
                                    "port_range": [low, low + 99],
                                    "stop_replicas_on_exit": True, "stop_grace_s": 2})
    text += f'[[commands.keys]]\nid = "k1"\nfile = "{tmp_path / "agent.key"}"\n'
    config = parse(text, str(tmp_path / "agent.toml"))
    agent = build_agent(config)
    assert agent.supervisor is not None
    agent.supervisor.runtimes = {**agent.supervisor.runtimes, **RUNTIMES}
    stop = asyncio.Event()
    topic = "llmops/v1/agents/gpu-sup/commands"
    body = {"name": "tiny-r1-a1b2c3", "deployment": "tiny", "version": "tiny@1",
            "runtime": "test", "gpus": [1]}
    async with Recorder(mosquitto) as rec:
        running = asyncio.create_task(agent.run(stop))
        try:
            statuses = await rec.wait_for(lambda: rec.of("status", Status), 10, "status")
            assert "commands.deploy_replica" in statuses[-1].capabilities
            assert "commands.evict_artifact" in statuses[-1].capabilities
            for command_id, payload in (("d1", body), ("bad", {**body, "gpus": "all"}),
                                        ("d2", {**body, "name": "tiny-r1-zzzzzz", "gpus": [7]})):
                command = sign_command("deploy_replica", payload, key_id="k1", secret=KEY,
                                       command_id=command_id)
                await publish(mosquitto, topic, encode(command))
            results = await rec.wait_for(
                lambda: (r := {x.command_id: x for x in rec.of("results", CommandResult)})
                and len(r) == 3 and r, 10, "three results")
            assert results["d1"].status == "ok" and results["d1"].detail["state"] == "pending"
            assert results["bad"].error == ("failed: deploy_replica body: field 'gpus': "
                                            "expected array, got str")
            assert results["d2"].error == "failed: GPU 7 not on this host (it has 0, 1)"

            def ready() -> list[Telemetry]:
                return [t for t in rec.of("telemetry", Telemetry)
                        for r in t.replicas if r.name == body["name"] and r.state == "ready"
                        and r.up]
            [snapshot, *_] = await rec.wait_for(ready, 20, "telemetry with the replica ready")
            [sample] = [r for r in snapshot.replicas if r.name == body["name"]]
            assert (sample.runtime, sample.deployment, sample.version, sample.gpus) == (
                "test", "tiny", "tiny@1", [1])
            assert sample.metrics["requests_running"] == 0.0
            assert sample.url is not None and sample.url.startswith("http://127.0.0.1:")
            events = [e for e in rec.of("events", Event) if e.kind == "replica_state"]
            assert [e.data["state"] for e in events] == ["pending", "starting", "ready"]

            sync = sign_command("sync", {}, key_id="k1", secret=KEY, command_id="s1")
            await publish(mosquitto, topic, encode(sync))
            [synced] = await rec.wait_for(
                lambda: [r for r in rec.of("results", CommandResult) if r.command_id == "s1"],
                10, "sync result")
            [listed] = synced.detail["replicas"]
            assert (listed["name"], listed["state"]) == (body["name"], "ready")
        finally:
            stop.set()
            await asyncio.wait_for(running, 15)
        # stop_replicas_on_exit: stopped, and said so before the agent went offline.
        await rec.wait_for(lambda: [s for s in rec.of("status", Status) if s.state == "offline"],
                           5, "offline status")
        stopped = [e for e in rec.of("events", Event) if e.data.get("state") == "stopped"]
        assert {(e.replica, e.ts) for e in stopped} == {(body["name"], stopped[0].ts)}, "QoS 1: maybe twice"
        topics = [str(m.topic).rsplit("/", 1)[1] for m in rec.messages]
        assert (max(i for i, t in enumerate(topics) if t == "events")
                < max(i for i, t in enumerate(topics) if t == "status"))
    assert replica_processes(state_dir) == [], "stop_replicas_on_exit stopped it"


def test_an_unusable_state_dir_is_a_config_error_naming_the_key(mosquitto, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    text = agent_config(mosquitto, supervisor={"state_dir": str(tmp_path / "a-file" / "state")})
    with pytest.raises(ConfigError, match=r"agent.toml: cannot create .*a-file/state.*"
                                          r"'supervisor.state_dir'"):
        build_agent(parse(text, str(tmp_path / "agent.toml")))
