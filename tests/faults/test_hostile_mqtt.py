"""Hostile MQTT at every door: whatever an agent (or anyone on the broker) publishes, the
controller stays up, counts every refusal by its reason, and does not grow; whatever reaches an
agent's command topic is refused with a counted reason and answered where it can be.

Real processes throughout: Mosquitto, the controller, an agent. Payloads come from
:mod:`tests.faults.fuzz` (mutations of valid messages, seeded) and are published with QoS 1, so
every one reaches its subscriber and the sums below are exact.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable

import paho.mqtt.client as paho
from hypothesis import HealthCheck, given, settings

from llm_ops_helper.agent.commands import CommandHandler
from llm_ops_helper.broker import LocalMosquitto
from llm_ops_helper.controller.ingest import DROP_REASONS
from llm_ops_helper.keys import read_key
from llm_ops_helper.localfleet import KEY_ID, LocalFleet
from llm_ops_helper.proto import codec
from llm_ops_helper.proto.messages import CommandResult
from llm_ops_helper.proto.signing import CommandVerifier, sign_command
from tests.faults.conftest import metrics, rss_bytes
from tests.faults.fuzz import hostile_stream, message_like, payload_bytes, valid_messages
from tests.integration.harness import Recorder

AGENT_KINDS = ["status", "telemetry", "events", "results"]
HOSTS = [f"fuzz-{i:02d}" for i in range(16)]
# Valid MQTT topic levels that are not valid host names: refused as bad_topic.
BAD_HOSTS = ["-dash-first", "a" * 64, "ünïcödé", "has space", ".dot-first"]
# The shipped mosquitto.conf caps a packet at 1 MiB; the topic and header fit in the rest.
PAYLOAD_LIMIT = (1 << 20) - 1024
# RSS after the second half of the payloads may exceed RSS after the first by this much. The
# halves are the same mix over the same hosts, so state that is bounded (per-host state, the
# once-per-(reason, host) log set, allocator arenas) is full after the first half; a leak of
# anything per payload would grow by the second half's payload bytes (tens to hundreds of MB),
# far over the bound.
RSS_GROWTH = 0.10


def publish_all(broker: LocalMosquitto, messages: Iterable[tuple[str, bytes]]) -> int:
    """Publish with QoS 1 and wait for every acknowledgement; the number published."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published(), f"publish {info.mid} not acknowledged: rc {info.rc}"
        return len(infos)
    finally:
        client.loop_stop()
        client.disconnect()


def accounted(m: dict[str, dict[str, float]]) -> float:
    """Every message the controller has seen: accepted by kind plus dropped by reason."""
    return (sum(m.get("llmops_ingest_messages_total", {}).values())
            + sum(m.get("llmops_ingest_dropped_total", {}).values()))


async def wait_accounted(fleet: LocalFleet, target: float, what: str,
                         timeout_s: float = 600.0) -> dict[str, dict[str, float]]:
    """Until the controller has accounted for ``target`` messages (a hang guard, no promise)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = await metrics(fleet)
        if accounted(m) >= target or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.5)


async def test_controller_survives_counts_and_stays_flat_under_hostile_agent_topics(
        fleet: LocalFleet) -> None:
    """Hostile payloads on status, telemetry, events and results, through a real Mosquitto
    to the controller process: it never crashes (alive, no internal error, still ingests a valid
    message after), every payload is either accepted or dropped with a known reason (the sums
    in /metrics equal what was sent), and its RSS after the second half is within 10 % of its
    RSS after the first. The issue asks for at least 100,000; this sends 120,000 (~30 s)."""
    payloads = 120_000
    assert fleet.broker is not None and fleet.controller is not None
    now = time.time()
    before = accounted(await metrics(fleet))
    sent = 0
    ops: Counter[str] = Counter()
    rss: list[int] = []
    started = time.monotonic()
    for half in (1, 2):
        batch = []
        for kind, host, op, payload in hostile_stream(AGENT_KINDS, HOSTS, BAD_HOSTS,
                                                      payloads // 2, seed=half, now=now,
                                                      limit=PAYLOAD_LIMIT):
            ops[op] += 1
            batch.append((f"llmops/v1/agents/{host}/{kind}", payload))
        sent += await asyncio.to_thread(publish_all, fleet.broker, batch)
        del batch
        m = await wait_accounted(fleet, before + sent, f"half {half}")
        assert fleet.controller.running, fleet.controller.log()[-3000:]
        rss.append(rss_bytes(fleet.controller.pid))
    elapsed = time.monotonic() - started

    dropped = {r: n for r, n in m["llmops_ingest_dropped_total"].items() if n}
    accepted = sum(m["llmops_ingest_messages_total"].values())
    print(f"\n{sent} payloads in {elapsed:.1f} s; accepted {accepted:.0f}; dropped {dropped}; "
          f"RSS {rss[0] / 2**20:.1f} -> {rss[1] / 2**20:.1f} MiB; operators {dict(ops)}")
    assert m["llmops_broker_internal_errors_total"][""] == 0, fleet.controller.log()[-3000:]
    assert accounted(m) - before == sent, (accounted(m) - before, sent)
    assert set(dropped) <= set(DROP_REASONS), dropped
    assert {"bad_topic", "not_json", "schema", "unsupported_version", "host_mismatch",
            "bad_timestamp"} <= set(dropped)
    assert rss[1] <= rss[0] * (1 + RSS_GROWTH), rss

    # Still ingesting: a valid snapshot from a new host lands.
    good = valid_messages("after-fuzz", time.time())["telemetry"]
    await asyncio.to_thread(publish_all, fleet.broker,
                            [("llmops/v1/agents/after-fuzz/telemetry", codec.encode(good))])
    m2 = await wait_accounted(fleet, accounted(m) + 1, "the valid snapshot")
    assert (m2["llmops_ingest_messages_total"]["telemetry"]
            == m["llmops_ingest_messages_total"]["telemetry"] + 1)
    host = await asyncio.to_thread(fleet.get, "/api/v1/hosts/after-fuzz")
    assert host["online"] and host["last_ts"] == good.ts  # type: ignore[attr-defined]


async def test_agent_refuses_every_hostile_command_with_a_counted_reason(
        fleet: LocalFleet) -> None:
    """Hostile payloads on a real agent's command topic: the agent stays up, counts each
    refusal by reason (the counts it reports in its telemetry sum to what was sent), and then
    still applies a validly signed command."""
    assert fleet.broker is not None
    agent = fleet.add_agent("fuzz-agent")
    agent.daemon.start()
    await fleet.wait_ready(60)
    topic = f"llmops/v1/agents/{agent.host}/commands"
    commands = [(topic, payload) for _, _, _, payload in hostile_stream(
        ["commands"], HOSTS, [], 3_000, seed=7, now=time.time(), limit=PAYLOAD_LIMIT)]
    async with Recorder(fleet.broker, f"llmops/v1/agents/{agent.host}/results") as results:
        sent = await asyncio.to_thread(publish_all, fleet.broker, commands)

        def reported() -> dict[str, int]:
            telemetry = fleet.get(f"/api/v1/hosts/{agent.host}")["telemetry"]
            return dict(telemetry["agent"]["commands_rejected"]) if telemetry else {}

        deadline = time.monotonic() + 300
        while sum((counts := await asyncio.to_thread(reported)).values()) < sent:
            assert agent.daemon.running, agent.daemon.log()[-3000:]
            assert time.monotonic() < deadline, (counts, sent)
            await asyncio.sleep(0.5)
        print(f"\n{sent} hostile commands; refused by reason {counts}; "
              f"{len(results.messages)} answered")
        assert sum(counts.values()) == sent, counts
        assert agent.daemon.running

        # Still answering: a validly signed sync is applied.
        good = sign_command("sync", {}, key_id=KEY_ID, secret=read_key(fleet.key_path),
                            command_id="after-fuzz")
        await asyncio.to_thread(publish_all, fleet.broker, [(topic, codec.encode(good))])
        await results.wait_for(lambda: any(
            r.command_id == "after-fuzz" and r.status == "ok"
            for r in results.of("results", CommandResult)), 30, "the sync's result")
    assert "Traceback" not in agent.daemon.log()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=payload_bytes)
def test_codec_refuses_arbitrary_bytes_only_with_a_decode_error(payload: bytes) -> None:
    """Any bytes, decoded as any wire type, give a message or a DecodeError, nothing else."""
    for type_ in codec.PAYLOAD_TYPES.values():
        try:
            codec.decode(payload, type_)
        except codec.DecodeError as exc:
            assert exc.reason in codec.REASONS


async def test_a_deeply_nested_command_is_refused_not_fatal_to_the_agent() -> None:
    """Regression: a command nested 100,000 levels deep raised RecursionError out of the
    agent's best-effort read of its id, which stopped the agent process. Now it is refused and
    counted as ``decode_too_large``."""
    handler = CommandHandler("h1", CommandVerifier({KEY_ID: b"k" * 32}), {})
    for payload in (b'{"id":"x","a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                    b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        assert await handler.handle(payload) is None
    assert handler.rejected == {"decode_too_large": 2}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=message_like("commands") | payload_bytes)
async def test_command_handler_answers_any_payload_with_a_counted_refusal(payload: bytes) -> None:
    """Any payload shaped like a command (fields valid or arbitrary) or any bytes: the agent's
    handler returns (a result or nothing) and counts exactly one refusal; it never raises."""
    handler = CommandHandler("h1", CommandVerifier({KEY_ID: b"k" * 32}), {})
    await handler.handle(payload)
    assert sum(handler.rejected.values()) == 1
