"""The agent as a real process against a real Mosquitto: the promises of the foundation issue."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest

from llm_ops_helper.agent.link import SEND_WINDOW
from llm_ops_helper.proto.messages import Event, Status, Telemetry
from llm_ops_helper.proto.sequence import SeqTracker, Verdict
from tests.integration.harness import AgentProcess, Recorder, agent_config


@pytest.fixture
async def agent_factory(tmp_path: Path):
    started: list[AgentProcess] = []

    def make(config_text: str, name: str = "agent") -> AgentProcess:
        agent = AgentProcess(tmp_path / name, config_text)
        started.append(agent)
        return agent

    yield make
    for agent in started:
        await agent.close()


async def test_telemetry_with_8_simulated_gpus_arrives_within_3s(mosquitto, agent_factory) -> None:
    async with Recorder(mosquitto) as rec:
        agent = agent_factory(agent_config(mosquitto))
        started = time.monotonic()
        agent.start()
        first = await rec.wait_for(lambda: rec.of("telemetry", Telemetry), 3.0, "first telemetry")
        assert time.monotonic() - started < 3.0
        snapshot = first[0]
        assert snapshot.host == "gpu-test" and snapshot.seq == 1
        assert [g.index for g in snapshot.gpus] == list(range(8))
        assert all(g.healthy and g.memory_total_bytes for g in snapshot.gpus)
        assert snapshot.host_metrics is not None and snapshot.host_metrics.memory_total_bytes > 0
        assert {s.name: s.ok for s in snapshot.collectors} == {"simulated": True, "host": True,
                                                               "runtime": True}


async def test_status_is_retained_online_with_inventory(mosquitto, agent_factory) -> None:
    agent = agent_factory(agent_config(mosquitto))
    agent.start()
    async with Recorder(mosquitto) as rec:
        await rec.wait_for(lambda: rec.of("telemetry", Telemetry), 5.0, "telemetry")
    # A subscriber that arrives later gets the status from the broker's retained store.
    async with Recorder(mosquitto, topic="llmops/v1/agents/gpu-test/status") as late:
        statuses = await late.wait_for(lambda: late.of("status", Status), 3.0, "retained status")
        assert late.messages[0].retain
        assert statuses[-1].state == "online"
        assert len(statuses[-1].gpus) == 8


async def test_sigterm_publishes_offline_and_exits_0_within_5s(mosquitto, agent_factory) -> None:
    agent = agent_factory(agent_config(mosquitto))
    agent.start()
    async with Recorder(mosquitto) as rec:
        await rec.wait_for(lambda: rec.of("telemetry", Telemetry), 5.0, "telemetry")
        stopped = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert await agent.wait(5.0) == 0
        assert time.monotonic() - stopped < 5.0
        # Everything sampled went out before "offline": the last status follows the last seq.
        await rec.wait_for(lambda: [s for s in rec.of("status", Status) if s.state == "offline"],
                           2.0, "offline status")
        last_seq = rec.of("telemetry", Telemetry)[-1].seq
    async with Recorder(mosquitto, topic="llmops/v1/agents/gpu-test/status") as late:
        statuses = await late.wait_for(lambda: late.of("status", Status), 3.0, "retained status")
        assert (statuses[-1].state, statuses[-1].reason) == ("offline", "shutdown")
    lines = [json.loads(line) for line in agent.log().splitlines()]  # every line is JSON
    assert all({"event", "host", "level", "timestamp"} <= line.keys() for line in lines)
    assert lines[-1]["event"] == "agent_stopped"
    assert (lines[-1]["seq"], lines[-1]["unsent"]) == (last_seq, 0)


async def test_sigkill_last_will_sets_offline_within_1_5_keepalive(mosquitto, agent_factory) -> None:
    keepalive = 4
    agent = agent_factory(agent_config(mosquitto, broker={"keepalive_s": keepalive}))
    agent.start()
    async with Recorder(mosquitto, topic="llmops/v1/agents/gpu-test/status") as rec:
        await rec.wait_for(lambda: [s for s in rec.of("status", Status) if s.state == "online"],
                           5.0, "online status")
        killed = time.monotonic()
        agent.signal(signal.SIGKILL)
        await rec.wait_for(lambda: [s for s in rec.of("status", Status) if s.state == "offline"],
                           1.5 * keepalive, "Last Will")
        assert time.monotonic() - killed < 1.5 * keepalive
        assert rec.of("status", Status)[-1].reason == "lost"


async def test_broker_down_at_start_agent_retries_and_delivers_from_seq_1(
        mosquitto, agent_factory) -> None:
    # The controller's persistent session exists (the broker kept it) before the agent starts.
    async with Recorder(mosquitto, identifier="test-controller", persistent=True) as rec:
        await mosquitto.stop()
        agent = agent_factory(agent_config(mosquitto))
        agent.start()
        await asyncio.sleep(2.0)  # the agent runs, samples and buffers with no broker
        assert agent.process is not None and agent.process.poll() is None
        await mosquitto.start()
        await rec.wait_for(lambda: len(rec.of("telemetry", Telemetry)) >= 6, 10.0, "telemetry")
        seqs = [t.seq for t in rec.of("telemetry", Telemetry)]
        assert seqs == list(range(1, len(seqs) + 1))
    assert '"event": "broker_unreachable"' in agent.log()


@pytest.mark.slow
async def test_broker_stopped_30s_every_seq_arrives_exactly_once(mosquitto, agent_factory) -> None:
    """Nothing inside the buffer is lost; the consumer's (run_id, seq) check makes it exact.

    Telemetry is QoS 1 (at-least-once): a snapshot the broker took but never acknowledged
    before it went down is sent again, under the same seq. Those redeliveries are bounded by
    the agent's in-flight window, and the consumer drops them by seq.
    """
    agent = agent_factory(agent_config(mosquitto))
    async with Recorder(mosquitto, identifier="test-controller", persistent=True) as rec:
        agent.start()
        await rec.wait_for(lambda: len(rec.of("telemetry", Telemetry)) >= 3, 5.0, "telemetry")
        await mosquitto.stop()
        await asyncio.sleep(30)
        await mosquitto.start()
        outage_seqs = 30 / 0.5  # snapshots sampled during the outage
        await rec.wait_for(lambda: len(rec.of("telemetry", Telemetry)) > outage_seqs + 6, 20.0,
                           "the buffered snapshots")
    tracker = SeqTracker()
    snapshots = rec.of("telemetry", Telemetry)
    accepted = [t.seq for t in snapshots
                if tracker.observe(t.host, t.run_id, t.seq) is not Verdict.DUPLICATE]
    assert accepted == list(range(1, len(accepted) + 1)), "a seq was lost or reordered"
    assert tracker.missing("gpu-test") == 0 and tracker.late == 0
    assert tracker.duplicates <= SEND_WINDOW, "more redeliveries than messages in flight"
    assert len({t.run_id for t in snapshots}) == 1
    assert '"event": "broker_connected"' in agent.log()


async def test_scenario_xid_appears_as_critical_event_and_the_lost_gpu_alone_is_unhealthy(
        mosquitto, agent_factory, tmp_path) -> None:
    scenario = tmp_path / "xid.toml"
    scenario.write_text('[[events]]\nat_s = 1.0\ngpu = 2\nkind = "xid"\nxid = 79\n'
                        '[[events]]\nat_s = 1.0\ngpu = 2\nkind = "disappear"\n')
    agent = agent_factory(agent_config(mosquitto, gpus={"scenario": str(scenario)}))
    async with Recorder(mosquitto) as rec:
        agent.start()
        events = await rec.wait_for(
            lambda: [e for e in rec.of("events", Event) if e.kind == "xid"], 6.0, "XID event")
        after = await rec.wait_for(
            lambda: [t for t in rec.of("telemetry", Telemetry) if t.ts > events[0].ts + 1], 3.0,
            "telemetry after the fault")
    assert (events[0].gpu, events[0].data["xid"], events[0].severity) == (2, 79, "critical")
    assert len(events) == 1
    assert [e.gpu for e in rec.of("events", Event) if e.kind == "gpu_lost"] == [2]
    gpus = after[-1].gpus
    assert [g.index for g in gpus if not g.healthy] == [2]
    assert gpus[2].error == "GPU is lost" and gpus[2].temperature_c is None
    assert agent.process is not None and agent.process.poll() is None


async def test_outage_longer_than_the_buffer_drops_the_oldest_and_counts_them(
        mosquitto, agent_factory) -> None:
    agent = agent_factory(agent_config(mosquitto, telemetry={"buffer_s": 2.0}))  # 4 snapshots
    async with Recorder(mosquitto, identifier="test-controller", persistent=True) as rec:
        agent.start()
        await rec.wait_for(lambda: len(rec.of("telemetry", Telemetry)) >= 2, 5.0, "telemetry")
        await mosquitto.stop()
        await asyncio.sleep(5.0)  # ~10 snapshots sampled into a 4-snapshot buffer
        await mosquitto.start()
        before = len(rec.of("telemetry", Telemetry))
        await rec.wait_for(lambda: len(rec.of("telemetry", Telemetry)) >= before + 7, 10.0,
                           "the buffer and three fresh snapshots")
    tracker = SeqTracker()
    for t in rec.of("telemetry", Telemetry):
        tracker.observe(t.host, t.run_id, t.seq)
    dropped = rec.of("telemetry", Telemetry)[-1].agent.dropped_buffer_full
    assert dropped >= 4
    assert tracker.missing("gpu-test") == dropped, "every missing seq is a counted drop"


async def test_hostile_commands_are_answered_counted_and_survived(
        mosquitto, agent_factory, tmp_path) -> None:
    from llm_ops_helper.proto.codec import encode
    from llm_ops_helper.proto.messages import CommandResult
    from llm_ops_helper.proto.signing import sign_command
    from tests.integration.harness import publish

    (tmp_path / "agent.key").write_bytes(b"integration-secret\n")
    agent = agent_factory(agent_config(mosquitto, commands={}) +
                          f'[[commands.keys]]\nid = "k1"\nfile = "{tmp_path / "agent.key"}"\n')
    topic = "llmops/v1/agents/gpu-test/commands"
    async with Recorder(mosquitto) as rec:
        agent.start()
        await rec.wait_for(lambda: rec.of("telemetry", Telemetry), 5.0, "telemetry")
        forged = sign_command("sync", {}, key_id="k1", secret=b"wrong", command_id="forged")
        good = sign_command("sync", {}, key_id="k1", secret=b"integration-secret",
                            command_id="good")
        for payload in (b"\x00garbage", b"[" * 100_000, b"{" + b" " * (512 << 10) + b"}",
                        b'{"id": "schema", "kind": 7}', encode(forged), encode(good), encode(good)):
            await publish(mosquitto, topic, payload)

        def answered() -> dict[str, list[CommandResult]]:
            results: dict[str, list[CommandResult]] = {}
            for r in rec.of("results", CommandResult):
                results.setdefault(r.command_id, []).append(r)
            complete = {"schema", "forged"} <= results.keys() and len(results.get("good", [])) == 2
            return results if complete else {}
        results = await rec.wait_for(answered, 5.0, "command results")
        assert results["schema"][0].error.startswith("decode_schema")
        assert results["forged"][0].error.startswith("bad_signature")
        assert [r.status for r in results["good"]] == ["ok", "ok"]  # the duplicate is answered
        assert results["good"][0].detail["run_id"] == results["good"][1].detail["run_id"]

        seq_now = rec.of("telemetry", Telemetry)[-1].seq
        latest = await rec.wait_for(
            lambda: [t for t in rec.of("telemetry", Telemetry) if t.seq > seq_now + 1], 5.0,
            "telemetry after the hostile commands")
        assert latest[-1].agent.commands_rejected == {
            "decode_not_json": 1, "decode_too_large": 1, "decode_schema": 2, "bad_signature": 1}
    assert agent.process is not None and agent.process.poll() is None
    assert '"event": "command_rejected"' in agent.log()
