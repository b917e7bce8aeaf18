"""Replicas that crash-loop and replicas that hang.

Real parts throughout: Mosquitto, the controller and two agents (simulated GPUs) as processes
(:class:`LocalFleet`); the replicas are real ``sim`` server processes whose model card injects
the fault (``faults.crash_after_s``: exit 1 that long after becoming ready;
``faults.hang_after_s``: from then on accept connections and never answer, health included).

The promises:

- a crash-looping replica is restarted by its agent with growing delays (equal-jitter
  exponential backoff), raises ``replica_restarting`` (and ``replica_down`` while it is down),
  is given up after its crash-loop limit, and the controller re-places it on another host only
  after its own backoff: placements never come faster than the backoff allows, one per failure;
- a replica that hangs is caught by the liveness probe (a timeout, not a refused connection),
  its process is killed, and a new process of the same replica serves again, and keeps
  serving. The hang fires once: as soon as the first process has read its model card, the
  test takes the fault out of the agent's cached copy of that card (same size, so the cache
  keeps it), so the process the agent starts next is a healthy one and the window to see it
  serve is not bounded by a second hang.

No replica process outlives its fleet; any that does is killed and fails the test.

Figures (``-s``): the agent's restart delays and the measured exit-to-start gaps; placements
and their spacing against the backoff; seconds from a hang to the replica serving again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.client import LLMOpsHelper
from llm_ops_helper.controller.deployments.failures import backoff_s
from llm_ops_helper.localfleet import LocalFleet
from tests.faults.fleetwatch import (
    MARK,
    alerts,
    events,
    log_events,
    log_time,
    replicas,
    sim_processes,
    until,
)

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 4.0
LIVENESS_INTERVAL_S = 0.5
CRASH_LOOP_RESTARTS = 3  # ReplicaSpec.crash_loop_restarts' default


def make_fleet(tmp_path: Path, mark: str) -> LocalFleet:
    return LocalFleet(
        tmp_path / "fleet", agents_count=2, gpus_per_agent=2, gpu_profile="a100-sxm4-80gb",
        interval_s=0.5, env={MARK: mark},
        agent_overrides={"supervisor": {"restart_backoff_min_s": BACKOFF_MIN_S,
                                        "restart_backoff_max_s": BACKOFF_MAX_S,
                                        "liveness_interval_s": LIVENESS_INTERVAL_S,
                                        "liveness_failures": 2}},
        controller_overrides={"rules": {"replica_startup_grace_s": 0.5}})


async def deploy(fleet: LocalFleet, card: Path, name: str, wait: bool) -> None:
    helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
    if wait:
        await asyncio.to_thread(helper.deploy_model, str(card), name=name, replicas=1,
                                gpu_memory_bytes=16 << 30, timeout=90)
        return
    await asyncio.to_thread(helper.deploy_model, str(card), name=name, replicas=1,
                            gpu_memory_bytes=16 << 30, wait=False)


async def test_crash_looping_replica_backs_off_alerts_and_is_re_placed_without_flapping(
        tmp_path: Path) -> None:
    """A replica whose server exits 1.5 s after becoming ready: its agent restarts it with
    growing delays, replica_restarting fires, the agent gives up after the crash-loop limit,
    and the controller places a new replica on the other host after its backoff, then the
    next after a longer one: never more placements than failures + 1, never sooner than the
    backoff."""
    mark = uuid.uuid4().hex
    fleet = make_fleet(tmp_path, mark)
    name = "sim-crash"
    try:
        async with fleet:
            card = write_model_card(tmp_path / f"{name}.toml", startup_s=0.2,
                                    crash_after_s=1.5)
            await deploy(fleet, card, name, wait=False)
            # Two failures, two backoffs, three placements: the controller's whole cycle.
            await until(lambda: len(events(fleet, name, "replica_placed")) >= 3, 150,
                        "a third placement", pause_s=0.5)
            placed = events(fleet, name, "replica_placed")
            backoffs = events(fleet, name, "backoff")
            history = events(fleet, name)

            # The agent: restarts with growing delays, then gives up.
            first_host = placed[0]["data"]["host"]
            agent = next(a for a in fleet.agents if a.host == first_host)
            first = placed[0]["data"]["replica"]
            restarting = [r for r in log_events(agent.daemon.log_path, "replica_restarting")
                          if r["replica"] == first]
            started = [r for r in log_events(agent.daemon.log_path, "replica_started")
                       if r["replica"] == first]
            delays = [r["delay_s"] for r in restarting]
            gaps = [log_time(s) - log_time(r) for r, s in zip(restarting, started[1:],
                                                                strict=False)]
            print(f"\nagent restart delays {delays} s; exit-to-start gaps "
                  f"{[round(g, 2) for g in gaps]} s")
            assert len(restarting) == CRASH_LOOP_RESTARTS, restarting
            for attempt, delay in enumerate(delays):
                capped = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** attempt)
                assert capped / 2 - 0.01 <= delay <= capped + 0.01, (attempt, delay)
            assert delays == sorted(delays), "delays grow"
            assert all(g >= d - 0.02 for g, d in zip(gaps, delays, strict=False)), \
                "each restart waited out its delay"
            failed = [r for r in log_events(agent.daemon.log_path, "replica_state_changed")
                      if r["replica"] == first and r["state"] == "failed"]
            assert len(failed) == 1 and "crash loop" in failed[0]["reason"], failed

            # The alerts: restarting (critical) and down, for that replica on that host.
            raised = {(a["rule"], a["host"], a.get("replica")) for a in alerts(fleet)}
            print(f"alerts raised: {sorted(raised)}")
            assert ("replica_restarting", first_host, first) in raised
            assert ("replica_down", first_host, first) in raised

            # The controller: no flapping. Each placement after the first follows a failure
            # and its backoff; the first replacement goes to the other host.
            spacing = [round(b["ts"] - a["ts"], 1) for a, b in itertools.pairwise(placed)]
            print(f"placements {len(placed)} in {placed[-1]['ts'] - placed[0]['ts']:.1f} s, "
                  f"spaced {spacing} s; backoffs "
                  f"{[(b['data']['failures'], backoff_s(b['data']['failures'])) for b in backoffs]}")
            assert placed[1]["data"]["host"] != first_host
            assert len(placed) <= len(backoffs) + 1
            for later in placed[1:]:
                before = [b for b in backoffs if b["ts"] <= later["ts"]]
                assert before, f"a placement with no failure before it: {later}"
                last = before[-1]
                waited = later["ts"] - last["ts"]
                assert waited >= backoff_s(last["data"]["failures"]) - 0.01, \
                    (later, last, waited)
            assert [e["data"]["failures"] for e in backoffs] == \
                list(range(1, len(backoffs) + 1))
            assert all(e["kind"] != "rollback_started" for e in history)
    finally:
        leftovers = kill_leftovers(mark)
    assert leftovers == {}, f"replica processes left running after the fleet stopped: {leftovers}"


def kill_leftovers(mark: str) -> dict[int, str]:
    """The test's replica processes still running, each SIGKILLed (the test fails on them)."""
    leftovers = sim_processes(mark)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def model_card_of(pid: int) -> Path:
    """The ``--model-card`` a simulator process was started with (the agent's cached blob)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return Path(argv[argv.index("--model-card") + 1])


def disarm_hang(card: Path) -> None:
    """Comment out ``hang_after_s`` in a model card, keeping its size (the agent's cache takes
    a blob of another size for a broken one)."""
    text = card.read_text()
    assert text.count("\nhang_after_s") == 1, text
    disarmed = text.replace("\nhang_after_s", "\n#ang_after_s")
    card.write_text(disarmed)
    assert card.stat().st_size == len(text.encode())


def hangs(url: str, timeout_s: float = 1.0) -> bool:
    """True when the server accepts a connection and sends nothing back to a health request
    within ``timeout_s``; False when it answers, refuses or closes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(timeout_s)
            try:
                return sock.recv(1) == b"" and False
            except TimeoutError:
                return True
    except OSError:
        return False


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def test_hung_replica_is_caught_by_liveness_probe_and_replaced(tmp_path: Path) -> None:
    """A replica whose server starts hanging 1.5 s after becoming ready (it accepts
    connections, answers nothing, health included): the liveness probe times out, the agent
    kills that process and starts a new one, which serves again and is still serving, with no
    further probe failure, several liveness intervals later."""
    mark = uuid.uuid4().hex
    fleet = make_fleet(tmp_path, mark)
    name = "sim-hang"
    try:
        async with fleet:
            card = write_model_card(tmp_path / f"{name}.toml", startup_s=0.2, hang_after_s=1.5)
            await deploy(fleet, card, name, wait=True)
            (replica,) = replicas(fleet, name)
            url = replica["url"]
            (hung_pid,) = sim_processes(mark)
            # The fault fires once: the next process the agent starts reads a card without it.
            disarm_hang(model_card_of(hung_pid))
            await until(lambda: hangs(url), 30, "the replica hanging", pause_s=0.1)
            hung_at = time.time()

            def serving_again() -> dict[str, Any] | None:
                pids = sim_processes(mark)
                if hung_pid in pids or len(pids) != 1:
                    return None
                (r,) = replicas(fleet, name)
                return r if r["state"] == "ready" and answers(r["url"]) else None

            again = await until(serving_again, 60, "a new process serving", pause_s=0.1)
            print(f"\nhung replica caught and serving again after {time.time() - hung_at:.2f} s")
            assert again["name"] == replica["name"] and again["restarts"] >= 1
            (new_pid,) = sim_processes(mark)
            agent = next(a for a in fleet.agents if a.host == replica["host"])
            probes_then = len([r for r in log_events(agent.daemon.log_path,
                                                     "replica_probe_failed")
                               if r["replica"] == replica["name"]])
            # Still serving, the same process, six liveness intervals later.
            await asyncio.sleep(6 * LIVENESS_INTERVAL_S)
            assert set(sim_processes(mark)) == {new_pid}, "the new process did not last"
            (later,) = replicas(fleet, name)
            assert later["state"] == "ready" and await asyncio.to_thread(answers, later["url"])
            probes = [r for r in log_events(agent.daemon.log_path, "replica_probe_failed")
                      if r["replica"] == replica["name"]]
            assert len(probes) == probes_then, "probe failures after the replacement"
            assert probes and all("no answer from" in r["error"] for r in probes), probes
            restarting = log_events(agent.daemon.log_path, "replica_restarting")
            assert len(restarting) == 1, restarting
            assert "health probe failed" in restarting[0]["after"]
    finally:
        leftovers = kill_leftovers(mark)
    assert leftovers == {}, f"replica processes left running after the fleet stopped: {leftovers}"


def test_backoff_is_not_reset_by_a_deployment_available_between_crashes(tmp_path: Path) -> None:
    """Regression: a deployment whose replica crashes seconds after each start is available
    between crashes; that used to reset its failure count, so the controller re-placed a
    crash-looping replica every 10 s for ever. The count now resets only once the deployment
    has been available RECOVERED_AFTER_S after its last failure."""
    from llm_ops_helper.controller.deployments.failures import RECOVERED_AFTER_S, Failures
    from llm_ops_helper.controller.deployments.ledger import Ledger
    from llm_ops_helper.controller.deployments.spec import DeploymentSpec
    from llm_ops_helper.controller.deployments.store import Deployment, DeploymentStore

    ledger = Ledger(DeploymentStore(tmp_path / "controller.db"))
    failures = Failures(ledger, registry=None)  # type: ignore[arg-type]  # unused by backoff
    d = Deployment(name="d", spec=DeploymentSpec(model="m@1"), revision=1, created_at=0.0,
                   updated_at=0.0, created_by="test")
    failures.back_off(d, [("d-r1", "crash loop")], now=100.0)
    assert (d.failures, d.backoff_until) == (1, 110.0)
    failures.recovered(d, now=112.0)  # ready for a moment before the next crash
    failures.back_off(d, [("d-r2", "crash loop")], now=125.0)
    assert (d.failures, d.backoff_until) == (2, 125.0 + backoff_s(2))
    failures.recovered(d, now=125.0 + RECOVERED_AFTER_S - 1)
    assert d.failures == 2
    failures.recovered(d, now=125.0 + RECOVERED_AFTER_S)
    assert (d.failures, d.backoff_until) == (0, None)
