"""Broker restart: Mosquitto killed with SIGKILL, down for 30 s, restarted on its port.

Real parts throughout: Mosquitto running the shipped config (persistence on), the controller,
three agents with simulated GPUs and ``sim`` replicas, all as processes (:class:`LocalFleet`).
The broker has written its persistence file once before it is killed, as any broker up longer
than its ``autosave_interval`` has: the sessions (and their subscriptions) come back with it.

What the test holds the fleet to, measured from the controller's own counters and the agents'
own logs (figures printed with ``-s``):

- every agent reconnects;
- every telemetry ``seq`` sampled in the outage (well inside the agents' buffer) reaches the
  controller exactly once: none missing, redeliveries counted as duplicates and dropped;
- a scale issued just before the kill and one issued while the broker is down both take effect
  once: every command the controller logged as sent (``command_sent``) is answered by its
  agent exactly once, every deploy applied exactly once, every desired replica deployed; the
  replicas end exactly as desired, one process each, none left once the fleet stops;
- the controller shows the gap as a broker outage (``/healthz`` degraded, a new broker
  session), never as hosts lost, anomalies or alerts.

The seqs sampled and the messages counted are read at one instant of the controller's ingest
(:func:`ingest_snapshot`: ``/metrics`` scraped before and after the hosts are read, again until
no telemetry arrived in between), so live traffic cannot put them one message apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from llm_ops_helper.agent.link import SEND_WINDOW
from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.broker import LocalMosquitto
from llm_ops_helper.client import LLMOpsHelper
from llm_ops_helper.localfleet import LocalFleet
from tests.faults.fleetwatch import log_events, log_time, until
from tests.integration.harness import Recorder, publish

OUTAGE_S = 30.0
INTERVAL_S = 0.5
AGENTS = 3
SIM_MODULE = "llm_ops_helper.agent.runtimes.simserver"
TELEMETRY = 'llmops_ingest_messages_total{kind="telemetry"}'
# What an agent logs for a command it took in: applied, or answered with an error.
OUTCOMES = ("command_applied", "command_failed", "command_rejected", "command_internal_error")
_SAMPLE = re.compile(r'^([a-z_]+)(?:\{([^}]*)\})? ([-+0-9.eEinfa]+)$')


def metrics(fleet: LocalFleet) -> dict[str, float]:
    """The controller's /metrics page as ``name{labels}`` -> value."""
    request = urllib.request.Request(fleet.url + "/metrics",
                                     headers={"Authorization": f"Bearer {fleet.token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if (m := _SAMPLE.match(line)) is not None:
            out[m[1] + (f"{{{m[2]}}}" if m[2] else "")] = float(m[3])
    return out


def healthz(fleet: LocalFleet) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(fleet.url + "/healthz", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def last_seqs(fleet: LocalFleet) -> dict[str, tuple[str, int, float]]:
    """Host -> (run_id, seq, ts) of the newest snapshot the controller holds."""
    out = {}
    for agent in fleet.agents:
        t = fleet.get(f"/api/v1/hosts/{agent.host}")["telemetry"]
        out[agent.host] = (t["run_id"], t["seq"], t["ts"])
    return out


def ingest_snapshot(fleet: LocalFleet, tries: int = 200
                    ) -> tuple[dict[str, tuple[str, int, float]], dict[str, float]]:
    """``last_seqs`` and ``/metrics`` as of one instant of the ingest: the metrics are scraped
    before and after the hosts are read, and the read is repeated until both scrapes agree on
    the telemetry counter (the ingest updates a host's seq and the counter in one step)."""
    for _ in range(tries):
        first = metrics(fleet)
        seqs = last_seqs(fleet)
        second = metrics(fleet)
        if first.get(TELEMETRY) == second.get(TELEMETRY):
            return seqs, second
    raise AssertionError(f"telemetry arrived during each of {tries} reads of the hosts")


def command_ledger(controller_log: Path, agent_logs: dict[str, Path],
                   sent_before: float | None = None
                   ) -> tuple[list[dict[str, Any]], dict[str, Counter[str]],
                              dict[str, Counter[str]]]:
    """(the commands the controller logged as sent, before ``sent_before`` if given; host ->
    command id -> outcomes its agent logged; host -> command id -> times applied)."""
    sent = [r for r in log_events(controller_log, "command_sent")
            if sent_before is None or log_time(r) < sent_before]
    outcomes = {h: Counter(str(r.get("command_id")) for e in OUTCOMES for r in log_events(p, e))
                for h, p in agent_logs.items()}
    applied = {h: Counter(r["command_id"] for r in log_events(p, "command_applied"))
               for h, p in agent_logs.items()}
    return sent, outcomes, applied


def unanswered(controller_log: Path, agent_logs: dict[str, Path]) -> list[dict[str, Any]]:
    """Commands the controller sent that their agent has not taken in (yet)."""
    sent, outcomes, _ = command_ledger(controller_log, agent_logs, time.time())
    return [c for c in sent if outcomes.get(c["host"], Counter())[c["command_id"]] == 0]


def check_commands(controller_log: Path, agent_logs: dict[str, Path],
                   desired: set[str], sent_before: float) -> dict[str, Any]:
    """No command lost, none applied twice: every command the controller sent before
    ``sent_before`` (the fleet's shutdown re-places replicas and sends more, to agents that
    are stopping) was taken in by its agent exactly once, every deploy applied exactly once,
    every desired replica deployed. What it found, for the figures."""
    sent, outcomes, applied = command_ledger(controller_log, agent_logs, sent_before)
    lost = [c for c in sent if outcomes.get(c["host"], Counter())[c["command_id"]] == 0]
    twice = [c for c in sent if outcomes.get(c["host"], Counter())[c["command_id"]] > 1]
    deploys = [c for c in sent if c["kind"] == "deploy_replica"]
    not_applied = [c for c in deploys if applied[c["host"]][c["command_id"]] != 1]
    deployed = {c["replica"] for c in deploys if applied[c["host"]][c["command_id"]] == 1}
    assert not lost, f"commands sent and never taken in by their agent: {lost}"
    assert not twice, f"commands taken in twice: {twice}"
    assert not not_applied, f"deploys not applied exactly once: {not_applied}"
    assert desired <= deployed, f"desired replicas never deployed: {desired - deployed}"
    ids = [c["command_id"] for c in sent]
    assert len(ids) == len(set(ids)), "the controller logged one command id twice"
    return {"sent": len(sent), "kinds": dict(Counter(c["kind"] for c in sent)),
            "deploys": len(deploys)}


def replica_processes(mark: str) -> list[int]:
    """Pids of simulator servers (replicas) carrying this test's environment mark."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LLMOPS_FAULT_MARK={mark}".encode() in environ.split(b"\0") \
                and SIM_MODULE.encode() in argv:
            found.append(int(entry.name))
    return found


async def test_broker_sigkilled_for_30s_loses_no_telemetry_or_command_and_shows_an_outage(
        tmp_path: Path) -> None:
    """Mosquitto (persistence on) SIGKILLed and restarted on the same port after 30 s, with a
    controller, three agents and sim replicas running: agents reconnect; every telemetry seq
    of the outage arrives exactly once; a scale sent right before the kill and one sent during
    the outage are neither lost nor applied twice (every command sent is taken in by its agent
    exactly once, every desired replica deployed, one process each, none left behind); the
    controller shows a broker outage, with no host lost, no anomaly and no alert for the gap."""
    mark = uuid.uuid4().hex
    fleet = LocalFleet(tmp_path / "fleet", agents_count=AGENTS, gpus_per_agent=2,
                       gpu_profile="a100-sxm4-80gb", interval_s=INTERVAL_S,
                       env={"LLMOPS_FAULT_MARK": mark})
    try:
        figures = await _outage(fleet, tmp_path, mark)
    finally:
        leftovers = replica_processes(mark)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert leftovers == [], f"replica processes left running after the fleet stopped: {leftovers}"
    print(f"commands sent {figures}")


async def _outage(fleet: LocalFleet, tmp_path: Path, mark: str) -> dict[str, Any]:
    """The scenario and its assertions; the command figures."""
    async with fleet:
        assert fleet.broker is not None
        broker = fleet.broker
        helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
        card = write_model_card(tmp_path / "sim-7b.toml", startup_s=0.5, itl_ms=2.0)
        deployment = await asyncio.to_thread(helper.deploy_model, str(card), name="sim-7b",
                                             replicas=2, gpu_memory_bytes=16 << 30, timeout=90)
        assert deployment.ready == 2
        await broker.save()  # what autosave_interval has written on any broker up a while

        # Right before the kill: a scale to 3, killed once the controller has sent it.
        await asyncio.to_thread(helper.scale, "sim-7b", 3)
        await until(lambda: len(helper.status("sim-7b").replicas) == 3, 15, "a third replica")
        before, counters_before = await asyncio.to_thread(ingest_snapshot, fleet)
        await broker.kill()
        killed_at = time.time()

        # During the outage: the controller says its link is down, a scale is accepted.
        code, health = await until(lambda: (r := healthz(fleet))[0] == 503 and r, 10,
                                   "/healthz to report the broker link down")
        assert health["broker_connected"] is False
        scaled = await asyncio.to_thread(helper.scale, "sim-7b", 4)
        assert scaled.desired == 4
        await asyncio.sleep(OUTAGE_S - (time.time() - killed_at) - 2)
        hosts_late_in_outage = (await asyncio.to_thread(fleet.get, "/api/v1/hosts"))["hosts"]
        await asyncio.sleep(OUTAGE_S - (time.time() - killed_at))

        await broker.start()  # same port, same persistence directory
        restarted_at = time.time()

        # (a) every agent reconnects: fresh telemetry from each, sampled after the restart.
        await until(lambda: all(ts > restarted_at for _, _, ts in last_seqs(fleet).values()),
                    30, "fresh telemetry from every agent")
        reconnected = time.time() - restarted_at
        # (c) the replicas end exactly as desired.
        final = await until(lambda: (d := helper.status("sim-7b")).ready == 4
                            and len(d.replicas) == 4 and d.phase == "available" and d, 60,
                            "four ready replicas")
        await asyncio.sleep(2 * INTERVAL_S)  # one more snapshot each, after the last replica
        assert fleet.controller is not None
        controller_log = fleet.controller.log_path
        agent_logs = {a.host: a.daemon.log_path for a in fleet.agents}
        # Every command sent so far taken in by its agent (bounded: a lost one fails below).
        with contextlib.suppress(AssertionError):
            await until(lambda: not unanswered(controller_log, agent_logs), 30,
                        "every command sent answered by its agent")
        checked_at = time.time()  # commands sent after this are the shutdown's
        after, counters_after = await asyncio.to_thread(ingest_snapshot, fleet)
        code_after, _ = await asyncio.to_thread(healthz, fleet)
        hosts_after = (await asyncio.to_thread(fleet.get, "/api/v1/hosts"))["hosts"]
        alerts = (await asyncio.to_thread(fleet.get, "/api/v1/alerts?state=all&limit=1000"))
        anomalies = await asyncio.to_thread(fleet.get,
                                            f"/api/v1/anomalies?since={killed_at - 5}")
        processes = replica_processes(mark)
        accepted_records = [r for a in fleet.agents
                            for r in log_events(a.daemon.log_path, "replica_accepted")]
        accepted = Counter(r["replica"] for r in accepted_records)
        # When each replica was accepted, relative to the kill (the agents log UTC ISO times).
        accepted_at = sorted(round(datetime.fromisoformat(r["timestamp"]).timestamp()
                                   - killed_at, 1) for r in accepted_records)
        applied = Counter(r["command_id"] for a in fleet.agents
                          for r in log_events(a.daemon.log_path, "command_applied"))
        redelivered = sum(len(log_events(a.daemon.log_path, "command_duplicate"))
                          for a in fleet.agents)
        agent_connects = {a.host: len(log_events(a.daemon.log_path, "broker_connected"))
                          for a in fleet.agents}
        controller_connects = len(log_events(controller_log, "broker_connected"))
        controller_unreachable = len(log_events(controller_log, "broker_unreachable"))
        dropped_buffer = {a.host: fleet.get(f"/api/v1/hosts/{a.host}")["telemetry"]["agent"]
                          ["dropped_buffer_full"] for a in fleet.agents}

    def delta(name: str) -> float:
        return counters_after.get(name, 0.0) - counters_before.get(name, 0.0)

    sampled = sum(after[h][1] - before[h][1] for h in before)
    received = delta(TELEMETRY)
    duplicates = delta('llmops_ingest_dropped_total{reason="duplicate"}')
    print(f"\nbroker outage {OUTAGE_S:.0f} s; agents back with fresh telemetry "
          f"{reconnected:.1f} s after the restart; agent connects {agent_connects}")
    print(f"telemetry: {sampled} seqs sampled across the window, {received:.0f} received once, "
          f"{duplicates:.0f} duplicates dropped, missing "
          f"{counters_before['llmops_ingest_seq_missing']:.0f} -> "
          f"{counters_after['llmops_ingest_seq_missing']:.0f}, "
          f"agent buffer drops {dropped_buffer}")
    print(f"commands: {len(applied)} applied, {redelivered} redeliveries answered from the "
          f"agents' result cache; replicas accepted {dict(accepted)}; "
          f"{len(processes)} replica processes; accepted at {accepted_at} s from the kill")
    print(f"controller: broker sessions +{delta('llmops_broker_connects_total'):.0f}, "
          f"{controller_unreachable} broker_unreachable log lines, "
          f"/healthz {code} during, {code_after} after; alerts {alerts['count']}, "
          f"anomalies in the window {anomalies['count']}")

    # (a) every agent reconnected, under the run it started with.
    assert all(n >= 2 for n in agent_connects.values()), agent_connects
    assert all(after[h][0] == before[h][0] for h in before), "an agent restarted"
    # (b) every seq sampled across the window arrived, once.
    assert all(n == 0 for n in dropped_buffer.values()), "the outage overflowed a buffer"
    assert sampled >= AGENTS * OUTAGE_S / INTERVAL_S * 0.9
    assert received == sampled, f"{sampled} sampled, {received} received"
    assert counters_after["llmops_ingest_seq_missing"] == \
        counters_before["llmops_ingest_seq_missing"], "seqs went missing in the outage"
    assert duplicates <= AGENTS * SEND_WINDOW, "more redeliveries than messages in flight"
    # (c) the replicas end as desired, one process each; no command lost or applied twice.
    commands = check_commands(controller_log, agent_logs, {r.name for r in final.replicas},
                              checked_at)
    assert (final.desired, final.ready, len(final.replicas)) == (4, 4, 4)
    assert sorted(accepted) == sorted(r.name for r in final.replicas)
    assert set(accepted.values()) == {1}, f"a replica was started twice: {accepted}"
    assert len(processes) == 4, f"replica processes {processes}"
    assert set(applied.values()) == {1}, f"a command was applied twice: {applied}"
    # (d) an outage of the broker link, not of the hosts; no anomaly, no alert.
    assert code == 503 and code_after == 200
    assert delta("llmops_broker_connects_total") >= 1
    assert controller_connects >= 2 and controller_unreachable >= 1, "no outage in the log"
    assert all(h["online"] for h in hosts_late_in_outage), hosts_late_in_outage
    assert all(h["online"] for h in hosts_after), hosts_after
    assert alerts["count"] == 0, alerts["alerts"]
    assert anomalies["count"] == 0, anomalies["anomalies"]
    return commands


async def test_a_saved_persistent_session_survives_a_broker_sigkill_and_restart_on_its_port(
        tmp_path: Path) -> None:
    """What the fleet test builds on: once the broker has written its persistence file, a
    SIGKILL and a restart on the same port keep a persistent session's subscription, and a
    QoS 1 message published for it while its client is away is delivered when it returns."""
    broker = LocalMosquitto(tmp_path / "mosquitto")
    await broker.start()
    try:
        port = broker.port
        async with Recorder(broker, topic="llmops/v1/agents/+/results",
                            identifier="saved-session", persistent=True):
            pass  # subscribed, then away
        await broker.save()
        await broker.save()  # a second save rewrites the file the first one wrote
        await broker.kill()
        await broker.start()
        assert broker.port == port
        await publish(broker, "llmops/v1/agents/gpu-a/results", b"while-away")
        async with Recorder(broker, topic="llmops/v1/agents/+/results",
                            identifier="saved-session", persistent=True) as rec:
            await rec.wait_for(lambda: rec.messages, 10.0, "the message queued while away")
        assert [m.payload for m in rec.messages] == [b"while-away"]
    finally:
        await broker.stop()
