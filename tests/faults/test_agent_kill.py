"""An agent killed with SIGKILL while its replicas serve.

Real parts throughout: Mosquitto, the controller and two agents (simulated GPUs) as processes
(:class:`LocalFleet`), ``sim`` replicas as real server processes. Replica processes are found
over the whole machine (psutil: the simulator's module in the command line, the test's mark in
the environment), so an orphan anywhere counts, whoever its parent is.

The promises:

- an agent started again adopts the replicas that outlived it (same pids, no restart) and
  replaces those that died while it was down (same names, new pids), never leaving a process
  that nothing supervises;
- an agent that does not come back: the controller marks its host offline at once (Last Will),
  raises ``host_offline``, and after ``host_lost_grace_s`` (not before) places its replicas on
  other hosts; when the agent does come back later, its forgotten replicas are stopped, so the
  machine runs exactly the desired replicas again.

Figures (``-s``): seconds from the kill to the host shown offline, to the replacement placed and
to it ready elsewhere; seconds from the late agent's return to its stale replica stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.client import LLMOpsHelper
from llm_ops_helper.localfleet import AgentHandle, LocalFleet
from tests.faults.fleetwatch import (
    MARK,
    alerts,
    events,
    host_online,
    log_events,
    ready_on,
    sim_processes,
    until,
)

DEPLOYMENT = "sim-kill"
GRACE_S = 3.0


def make_fleet(tmp_path: Path, mark: str, grace_s: float) -> LocalFleet:
    return LocalFleet(tmp_path / "fleet", agents_count=2, gpus_per_agent=2,
                      gpu_profile="a100-sxm4-80gb", interval_s=0.5, env={MARK: mark},
                      controller_overrides={"deployments": {"host_lost_grace_s": grace_s}})


async def deploy(fleet: LocalFleet, tmp_path: Path) -> dict[str, str]:
    """Two ready replicas, one per agent; name -> host."""
    helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
    card = write_model_card(tmp_path / f"{DEPLOYMENT}.toml", startup_s=0.2, itl_ms=1.0)
    deployment = await asyncio.to_thread(helper.deploy_model, str(card), name=DEPLOYMENT,
                                         replicas=2, gpu_memory_bytes=16 << 30, timeout=90)
    assert deployment.ready == 2
    placed = {r.name: r.host or "" for r in deployment.replicas if r.state == "ready"}
    assert sorted(placed.values()) == sorted(a.host for a in fleet.agents), placed
    return placed


async def sigkill(agent: AgentHandle) -> float:
    agent.daemon.signal(signal.SIGKILL)
    killed_at = time.time()
    assert await agent.daemon.wait(10) == -signal.SIGKILL
    return killed_at


def pids_of(processes: dict[int, str], name: str) -> set[int]:
    return {pid for pid, replica in processes.items() if replica == name}


async def test_agent_sigkilled_then_restarted_adopts_live_replicas_replaces_dead_ones_no_orphan(
        tmp_path: Path) -> None:
    """An agent SIGKILLed with a replica running, started again: the replica outlived it and
    is adopted (same pid, not restarted). SIGKILLed again, its replica killed too while it is
    down, started again: the replica is started anew under its name. Never more than one
    process per replica, and none left behind when the fleet stops."""
    mark = uuid.uuid4().hex
    fleet = make_fleet(tmp_path, mark, grace_s=600.0)  # this test is not about re-placement
    try:
        async with fleet:
            placed = await deploy(fleet, tmp_path)
            agent = fleet.agents[0]
            mine = next(n for n, h in placed.items() if h == agent.host)
            before = await until(lambda: sim_processes(mark) if len(sim_processes(mark)) == 2
                                 else None, 30, "two replica processes")

            # 1. Killed and started again: adopted, same processes. The controller has taken
            # the kill in (host offline) before the restart, and the new agent has adopted
            # (its own log says so) and is back online before anything is judged.
            await sigkill(agent)
            assert sim_processes(mark) == before, "replicas outlive a SIGKILLed agent"
            await until(lambda: not host_online(fleet, agent.host), 30,
                        f"{agent.host} shown offline after the kill")
            agent.daemon.start(fleet.env)
            await fleet.wait_ready(30)
            adopted = await until(lambda: log_events(agent.daemon.log_path, "replica_adopted"),
                                  30, f"{mine} adopted by the restarted agent")
            await until(lambda: host_online(fleet, agent.host)
                        and ready_on(fleet, DEPLOYMENT).get(mine) == agent.host, 30,
                        f"{agent.host} online again with {mine} ready on it")
            assert [r["replica"] for r in adopted] == [mine]
            assert adopted[0]["pid"] in pids_of(before, mine)
            assert sim_processes(mark) == before, "adopted: not restarted, not duplicated"
            assert log_events(agent.daemon.log_path, "replica_orphan_killed") == []

            # 2. Killed again, and its replica dies while it is down: replaced by a new process.
            await sigkill(agent)
            (old_pid,) = pids_of(before, mine)
            os.killpg(os.getpgid(old_pid), signal.SIGKILL)
            await until(lambda: old_pid not in sim_processes(mark), 10, "the replica gone")
            await until(lambda: not host_online(fleet, agent.host), 30,
                        f"{agent.host} shown offline after the second kill")
            restarted_at = time.time()
            agent.daemon.start(fleet.env)
            await fleet.wait_ready(30)
            lost = await until(lambda: log_events(agent.daemon.log_path, "replica_lost"), 30,
                               f"the restarted agent finding {mine} dead")

            def started_anew() -> dict[int, str] | None:
                found = sim_processes(mark)
                ok = len(pids_of(found, mine)) == 1 and old_pid not in found \
                    and host_online(fleet, agent.host) \
                    and ready_on(fleet, DEPLOYMENT).get(mine) == agent.host
                return found if ok else None

            after = await until(started_anew, 30, f"{mine} started anew and ready")
            print(f"\nreplaced a replica that died with its agent in "
                  f"{time.time() - restarted_at:.2f} s after the agent's start")
            assert pids_of(after, mine) != {old_pid}
            assert sorted(after.values()) == sorted(placed), "one process per replica, no more"
            assert [(r["replica"], r["action"]) for r in lost] == [(mine, "restarting")]
            # The controller kept its two replicas: nothing was re-placed.
            assert len(events(fleet, DEPLOYMENT, "replica_placed")) == 2
            assert ready_on(fleet, DEPLOYMENT) == placed
    finally:
        leftovers = sim_processes(mark)
        for pid in leftovers:
            _kill(pid)
    assert leftovers == {}, f"replica processes left running after the fleet stopped: {leftovers}"


async def test_agent_that_never_returns_is_marked_offline_and_its_replicas_replaced_after_grace(
        tmp_path: Path) -> None:
    """An agent SIGKILLed and not started again: the controller shows its host offline and
    raises host_offline; after host_lost_grace_s (and not before) its replica is placed on the
    other host and becomes ready there. When the agent comes back late, it adopts its old
    replica and the controller, which gave that one up, has it stopped: the machine ends with
    exactly the desired replicas, and none left behind when the fleet stops."""
    mark = uuid.uuid4().hex
    fleet = make_fleet(tmp_path, mark, grace_s=GRACE_S)
    try:
        async with fleet:
            placed = await deploy(fleet, tmp_path)
            agent, other = fleet.agents
            mine = next(n for n, h in placed.items() if h == agent.host)
            before = await until(lambda: sim_processes(mark) if len(sim_processes(mark)) == 2
                                 else None, 30, "two replica processes")
            (stale_pid,) = pids_of(before, mine)

            killed_at = await sigkill(agent)
            await until(lambda: not host_online(fleet, agent.host), 30,
                        f"{agent.host} shown offline")
            offline_s = time.time() - killed_at
            await until(lambda: any(a["rule"] == "host_offline" and a["host"] == agent.host
                                    for a in alerts(fleet, "firing")), 30, "host_offline")
            def all_on_other() -> dict[str, str] | None:
                found = ready_on(fleet, DEPLOYMENT)
                return found if len(found) == 2 and set(found.values()) == {other.host} \
                    else None

            ready = await until(all_on_other, 60, f"two ready replicas on {other.host}")
            ready_s = time.time() - killed_at
            (replacement,) = set(ready) - set(placed)
            placed_event = next(e for e in events(fleet, DEPLOYMENT, "replica_placed")
                                if e["data"].get("replica") == replacement)
            placed_s = placed_event["ts"] - killed_at
            print(f"\nagent SIGKILLed: host offline after {offline_s:.2f} s, replacement "
                  f"placed after {placed_s:.2f} s (grace {GRACE_S:g} s), ready elsewhere "
                  f"after {ready_s:.2f} s")
            assert placed_s >= GRACE_S, "re-placed only after the grace period"
            assert len(events(fleet, DEPLOYMENT, "replica_placed")) == 3, "one re-placement"

            # The agent returns late: its old replica is stopped, not kept beside the new one.
            returned_at = time.time()
            agent.daemon.start(fleet.env)
            await fleet.wait_ready(30)
            def stale_gone() -> dict[int, str] | None:
                found = sim_processes(mark)
                return found if stale_pid not in found else None

            final = await until(stale_gone, 60, "the late agent's stale replica stopped")
            print(f"late agent's stale replica stopped {time.time() - returned_at:.2f} s after "
                  "its return")
            assert len(final) == 2 and set(final.values()) == set(ready)
            assert ready_on(fleet, DEPLOYMENT) == ready
            assert not any(a["rule"] == "host_offline" and a["host"] == agent.host
                           for a in alerts(fleet, "firing"))
    finally:
        leftovers = sim_processes(mark)
        for pid in leftovers:
            _kill(pid)
    assert leftovers == {}, f"replica processes left running after the fleet stopped: {leftovers}"


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
