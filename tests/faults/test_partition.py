"""Network partition: one agent, in a network namespace of its own, cut off from the broker for
60 s by taking its veth link down, then healed.

Real parts throughout: Mosquitto running the shipped config (listening on 127.0.0.1 and on the
host end of the veth pair), the controller, an agent on the host and an agent inside the
namespace (``ip netns exec``), simulated GPUs and ``sim`` replicas, all as processes. The
namespace, the veth pair and their /30 are made by the test (iproute2) and deleted after it.

What the test holds the fleet to, measured from the controller's own API and counters and the
agents' own logs (figures printed with ``-s``):

- the cut-off agent reconnects after the heal, under the run it started with;
- every telemetry ``seq`` it sampled during the partition (well inside its buffer) reaches the
  controller exactly once: none missing, redeliveries counted as duplicates and dropped;
- a scale issued just after the link goes down is placed on the cut-off host (it has four
  GPUs to the other host's two, so it wins the scheduler's most-free-memory tie-break while the
  controller still thinks it online): its deploy command, sent after the cut, dies on the wire,
  waits in the broker and is applied there exactly once after the heal;
- that one, a scale issued during the partition, and whatever the controller sent the cut-off
  host meanwhile (its replicas are re-placed after ``host_lost_grace_s``) are neither lost nor
  applied twice: every command the controller logged as sent is taken in by its agent exactly
  once, every deploy applied once; the replicas end exactly as desired, one process each;
- the controller shows the gap as an outage of that host (offline, ``stale`` or ``lost``; a
  ``host_offline`` alert for it, raised after the cut, that resolves after the heal), never as
  anomalies or any other alert, and the other host never goes offline.

Seqs and counters are read at one instant of the ingest (``ingest_snapshot``); the alerts of
the window are those whose id did not exist before the cut (a Last Will carries the time the
agent connected, so its alert's ``started_at`` can predate the cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from llm_ops_helper.agent.link import SEND_WINDOW
from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.broker import LocalMosquitto, free_port
from llm_ops_helper.client import LLMOpsHelper
from llm_ops_helper.localfleet import LocalFleet
from tests.faults.fleetwatch import log_events, log_time, until
from tests.faults.netns import NetNamespace
from tests.faults.test_broker_restart import (
    check_commands,
    ingest_snapshot,
    last_seqs,
    replica_processes,
    unanswered,
)

PARTITION_S = 60.0
INTERVAL_S = 0.5
# Shorter than the partition, so the controller re-places the cut-off host's replica while it
# is away and has to stop the old one once it is back (the default, 60 s, would race the heal).
HOST_LOST_GRACE_S = 20.0
# The agent cut off (the fleet's own agent is gpu-01). It has more GPUs than the other host, so
# with one replica on each, the scheduler (fewest replicas, then most free memory) puts the
# scale sent as the link goes down there, and its command dies on the wire.
CUT_HOST = "gpu-00"
CUT_HOST_GPUS = 4


def host_summary(fleet: LocalFleet, host: str) -> dict[str, Any]:
    hosts = fleet.get("/api/v1/hosts")["hosts"]
    return next(h for h in hosts if h["host"] == host)


def first_after(records: list[dict[str, Any]], t: float) -> float | None:
    """Seconds from ``t`` to the first record logged after it (the agents log UTC ISO times)."""
    times = sorted(datetime.fromisoformat(r["timestamp"]).timestamp() for r in records)
    return next((s - t for s in times if s > t), None)


async def test_agent_partitioned_60s_by_netns_loses_no_telemetry_or_command_and_shows_host_outage(
        tmp_path: Path) -> None:
    """An agent in its own network namespace is cut off from the broker (veth link down) for
    60 s and healed, with a controller, a second agent and sim replicas running: the agent
    reconnects; every telemetry seq it sampled in the partition arrives exactly once; a scale
    sent just after the link goes down is placed on the cut-off host and its deploy, sent after
    the cut, is applied there once after the heal; it, one sent during the partition and the
    re-placement of the cut-off host's replicas are neither lost nor applied twice (every
    command sent taken in exactly once); the controller shows an outage of that host (offline,
    a host_offline alert raised in the window that resolves) and no anomaly or other alert."""
    mark = uuid.uuid4().hex
    try:
        await _partition(tmp_path, mark)
    finally:
        leftovers = replica_processes(mark)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert leftovers == [], f"replica processes left running after the fleet stopped: {leftovers}"


async def _partition(tmp_path: Path, mark: str) -> None:
    with NetNamespace() as ns:
        # The controller's API (artifact downloads) on the service address too, as advertised.
        port = free_port()
        fleet = LocalFleet(tmp_path / "fleet", agents_count=1, gpus_per_agent=2,
                           gpu_profile="a100-sxm4-80gb", interval_s=INTERVAL_S,
                           env={"LLMOPS_FAULT_MARK": mark}, preferred_http_port=port,
                           controller_overrides={
                               "deployments": {"host_lost_grace_s": HOST_LOST_GRACE_S},
                               "http": {"host": "0.0.0.0",
                                        "advertise_url": f"http://{ns.service_address}:{port}"}})
        async with fleet:
            assert fleet.broker is not None and fleet.http_port == port
            # The broker listens on the service address too (before any measurement starts).
            fleet.broker.also_listen = (ns.service_address,)
            await fleet.broker.stop()
            await fleet.broker.start()
            fleet.host_overrides[CUT_HOST] = {"broker": {"host": ns.service_address},
                                              "gpus": {"simulated_count": CUT_HOST_GPUS}}
            cut_agent = fleet.add_agent(CUT_HOST)
            with cut_agent.daemon.log_path.open("ab") as log:
                cut_agent.daemon.process = ns.popen(
                    [sys.executable, "-m", "llm_ops_helper.agent",
                     "--config", str(cut_agent.daemon.config_path)], env=fleet.env, log=log)
            await fleet.wait_ready()
            other = fleet.agents[0].host

            helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
            card = write_model_card(tmp_path / "sim-7b.toml", startup_s=0.5, itl_ms=2.0)
            # Two replicas: spread, one on each host.
            deployment = await asyncio.to_thread(
                helper.deploy_model, str(card), name="sim-7b", replicas=2,
                gpu_memory_bytes=16 << 30, timeout=90)
            assert deployment.ready == 2
            assert sorted(str(r.host) for r in deployment.replicas) == sorted([other, CUT_HOST])

            missing_before = (await asyncio.to_thread(fleet.get, f"/api/v1/hosts/{CUT_HOST}")
                              )["seq_missing"]
            alerts_before = {a["id"] for a in (await asyncio.to_thread(
                fleet.get, "/api/v1/alerts?state=all&limit=10000"))["alerts"]}
            before, counters_before = await asyncio.to_thread(ingest_snapshot, fleet)
            ns.cut()
            cut_at = time.time()
            # As the link goes down (the host still online to the controller): a scale to 3.
            # The scale answers after one reconcile pass: the third replica is placed by then.
            await asyncio.to_thread(helper.scale, "sim-7b", 3)
            third = await until(lambda: len((d := helper.status("sim-7b")).replicas) == 3 and d,
                                15, "a third replica")
            third_on = sorted(str(r.host) for r in third.replicas)
            (third_replica,) = [r for r in third.replicas
                                if r.name not in {x.name for x in deployment.replicas}]

            # During the partition: the host goes offline, a scale is accepted.
            offline = await until(lambda: not (h := host_summary(fleet, CUT_HOST))["online"]
                                  and h, 30, f"{CUT_HOST} offline")
            detected = time.time() - cut_at
            scaled = await asyncio.to_thread(helper.scale, "sim-7b", 4)
            assert scaled.desired == 4
            reasons = {offline["offline_reason"]}
            other_online = True
            while time.time() - cut_at < PARTITION_S:
                hosts = (await asyncio.to_thread(fleet.get, "/api/v1/hosts"))["hosts"]
                for h in hosts:
                    if h["host"] == CUT_HOST:
                        assert not h["online"], f"{CUT_HOST} online while cut off: {h}"
                        reasons.add(h["offline_reason"])
                    else:
                        other_online = other_online and h["online"]
                await asyncio.sleep(1.0)
            during = await asyncio.to_thread(helper.status, "sim-7b")

            ns.heal()
            healed_at = time.time()

            # (a) the agent reconnects: fresh telemetry from it, sampled after the heal.
            await until(lambda: last_seqs(fleet)[CUT_HOST][2] > healed_at, 60,
                        f"fresh telemetry from {CUT_HOST}")
            fresh = time.time() - healed_at
            # (c) the replicas end exactly as desired (the old one on the cut host stopped).
            final = await until(lambda: (d := helper.status("sim-7b")).ready == 4
                                and len(d.replicas) == 4 and d.phase == "available"
                                and len(replica_processes(mark)) == 4 and d, 90,
                                "four ready replicas, four processes")
            await until(lambda: fleet.get("/api/v1/alerts")["count"] == 0, 30,
                        "the host_offline alert to resolve")
            await asyncio.sleep(2 * INTERVAL_S)  # one more snapshot each, after the last change
            assert fleet.controller is not None
            controller_log = fleet.controller.log_path
            logs = {a.host: a.daemon.log_path for a in fleet.agents}
            # Every command sent so far taken in by its agent (bounded: a lost one fails below).
            with contextlib.suppress(AssertionError):
                await until(lambda: not unanswered(controller_log, logs), 30,
                            "every command sent answered by its agent")
            checked_at = time.time()  # commands sent after this are the shutdown's
            after, counters_after = await asyncio.to_thread(ingest_snapshot, fleet)
            cut_host = await asyncio.to_thread(fleet.get, f"/api/v1/hosts/{CUT_HOST}")
            hosts_after = (await asyncio.to_thread(fleet.get, "/api/v1/hosts"))["hosts"]
            alerts = (await asyncio.to_thread(fleet.get, "/api/v1/alerts?state=all&limit=1000"))
            anomalies = await asyncio.to_thread(fleet.get,
                                                f"/api/v1/anomalies?since={cut_at - 5}")
            processes = replica_processes(mark)
            accepted = Counter(r["replica"] for p in logs.values()
                               for r in log_events(p, "replica_accepted"))
            applied_records = [r for p in logs.values() for r in log_events(p, "command_applied")]
            applied = Counter(r["command_id"] for r in applied_records)
            applied_kinds = Counter(r["kind"] for r in applied_records)
            # The third replica's deploy: when the controller sent it, when its agent applied it.
            third_sent = [r for r in log_events(controller_log, "command_sent")
                          if r.get("replica") == third_replica.name
                          and r["kind"] == "deploy_replica"]
            third_applied = [r for r in log_events(logs[CUT_HOST], "command_applied")
                             if r["command_id"] in {c["command_id"] for c in third_sent}]
            after_heal = Counter(r["kind"] for r in log_events(logs[CUT_HOST], "command_applied")
                                 if datetime.fromisoformat(r["timestamp"]).timestamp()
                                 > healed_at)
            redelivered = sum(len(log_events(p, "command_duplicate")) for p in logs.values())
            connects = log_events(logs[CUT_HOST], "broker_connected")
            reconnected = first_after(connects, healed_at)
            dropped_buffer = cut_host["telemetry"]["agent"]["dropped_buffer_full"]

    assert not ns.exists(), f"namespace {ns.name} left behind"

    def delta(name: str) -> float:
        return counters_after.get(name, 0.0) - counters_before.get(name, 0.0)

    sampled = sum(after[h][1] - before[h][1] for h in before)
    sampled_cut = after[CUT_HOST][1] - before[CUT_HOST][1]
    received = delta('llmops_ingest_messages_total{kind="telemetry"}')
    duplicates = delta('llmops_ingest_dropped_total{reason="duplicate"}')
    # Alerts of the window: raised after the cut, whatever time they carry (the broker restart
    # that opened the service address, before the measurements, may have had its own).
    window_alerts = [a for a in alerts["alerts"] if a["id"] not in alerts_before]
    firing_or_resolved = Counter((a["rule"], a["host"], a["state"]) for a in window_alerts)
    print(f"\npartition {PARTITION_S:.0f} s: {CUT_HOST} offline ({sorted(reasons)}) "
          f"{detected:.1f} s after the cut; broker session back {reconnected} s and fresh "
          f"telemetry {fresh:.1f} s after the heal; agent connects {len(connects)}")
    print(f"telemetry: {sampled_cut} seqs sampled by {CUT_HOST} ({sampled} by both), "
          f"{received:.0f} received once, {duplicates:.0f} duplicates dropped, "
          f"missing {missing_before} -> {cut_host['seq_missing']}, buffer drops {dropped_buffer}")
    print(f"commands: {len(applied)} applied {dict(applied_kinds)}, {redelivered} redeliveries "
          f"answered from the result cache; replicas accepted {dict(accepted)}; "
          f"{len(processes)} replica processes; the third ({third_replica.name}) placed on "
          f"{third_replica.host} (all: {third_on}), its deploy sent "
          f"{[round(log_time(r) - cut_at, 2) for r in third_sent]} s after the cut and applied "
          f"{[round(log_time(r) - healed_at, 2) for r in third_applied]} s after the heal, "
          f"applied on {CUT_HOST} after the heal {after_heal}; during the cut: desired {during.desired}, "
          f"ready {during.ready}, on {sorted(str(r.host) for r in during.replicas)}; final on "
          f"{sorted(str(r.host) for r in final.replicas)}")
    print(f"controller: alerts {dict(firing_or_resolved)}, anomalies in the window "
          f"{anomalies['count']}")

    # (a) the agent reconnected, under the run it started with.
    assert reconnected is not None, "no broker session after the heal"
    assert after[CUT_HOST][0] == before[CUT_HOST][0], "the cut-off agent restarted"
    # (b) every seq sampled across the window arrived, once.
    assert dropped_buffer == 0, "the partition overflowed the agent's buffer"
    assert sampled_cut >= PARTITION_S / INTERVAL_S * 0.9
    assert received == sampled, f"{sampled} sampled, {received} received"
    assert cut_host["seq_missing"] == missing_before, "seqs went missing in the partition"
    assert counters_after["llmops_ingest_seq_missing"] == \
        counters_before["llmops_ingest_seq_missing"], "seqs went missing in the partition"
    assert duplicates <= 2 * SEND_WINDOW, "more redeliveries than messages in flight"
    # (c) the scale sent as the link went down: placed on the cut-off host, its deploy sent
    # there after the cut and applied there after the heal (once: check_commands below).
    assert str(third_replica.host) == CUT_HOST, f"the third replica went to {third_replica.host}"
    assert third_sent and all(log_time(r) >= cut_at and r["host"] == CUT_HOST
                              for r in third_sent), third_sent
    assert third_applied and all(log_time(r) > healed_at for r in third_applied), third_applied
    assert accepted[third_replica.name] == 1, accepted
    # The replicas end as desired, one process each; no command lost or applied twice.
    commands = check_commands(controller_log, logs, {r.name for r in final.replicas},
                              checked_at)
    print(f"commands sent {commands}")
    assert (final.desired, final.ready, len(final.replicas)) == (4, 4, 4)
    assert set(accepted.values()) == {1}, f"a replica was started twice: {accepted}"
    assert len(processes) == 4, f"replica processes {processes}"
    assert set(applied.values()) == {1}, f"a command was applied twice: {applied}"
    # (d) an outage of that host, and only of it; no anomaly, no other alert.
    assert reasons <= {"stale", "lost"}, reasons
    assert other_online, f"{other} went offline during the partition"
    assert all(h["online"] for h in hosts_after), hosts_after
    assert set(firing_or_resolved) == {("host_offline", CUT_HOST, "resolved")}, window_alerts
    assert not [a for a in alerts["alerts"] if a["state"] == "firing"], "an alert still fires"
    assert anomalies["count"] == 0, anomalies["anomalies"]


async def test_a_namespace_reaches_the_broker_through_its_veth_only_while_linked(
        tmp_path: Path) -> None:
    """What the partition test builds on: a broker told to ``also_listen`` on the namespace's
    service address answers a client inside the namespace; with the link cut the client gets
    no broker; healed, it does again; deleting the namespace leaves nothing behind."""
    probe = ("import socket, sys\n"
             "try:\n"
             "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
             "except OSError as exc:\n"
             "    sys.exit(f'no broker: {exc}')\n")
    broker = LocalMosquitto(tmp_path / "mosquitto")
    with NetNamespace() as ns:
        broker.also_listen = (ns.service_address,)
        await broker.start()
        try:
            def reach() -> int:
                process = ns.popen([sys.executable, "-c", probe, ns.service_address,
                                    str(broker.port)])
                return process.wait(30)

            assert await asyncio.to_thread(reach) == 0
            ns.cut()
            assert await asyncio.to_thread(reach) != 0
            ns.heal()
            assert await until(lambda: reach() == 0, 30, "the broker after the heal")
        finally:
            await broker.stop()
    assert not ns.exists(), f"{ns.name} or its links left behind"
