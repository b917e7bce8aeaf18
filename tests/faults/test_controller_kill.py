"""Controller killed with SIGKILL in the middle of a rolling update, then started again.

Real parts throughout: Mosquitto, the controller and three agents with simulated GPUs as
processes (:class:`LocalFleet`), ``sim`` replicas (the project's vLLM-compatible simulator) as
the agents' children, the controller's own SQLite file (WAL) and checkpoint files.

The rollout is slow enough to catch half-way: version 2's model card takes
``NEW_STARTUP_S`` to load and ``max_surge`` is 1, so one new replica starts at a time. The
controller is killed as soon as the first new replica is placed and stays down until its
agent reports that replica ready: the agent's replica_state news is all the controller gets
of it, from its persistent broker session, once it is back.

What the test holds the controller to (figures printed with ``-s``):

- the registry and the deployments are intact: the same versions, aliases, deployments and
  revisions after the crash as before it, and ``PRAGMA integrity_check`` ok;
- the rollout resumes to completion: every replica on version 2, ready, none of version 1;
- no duplicate replicas: exactly the desired count of replica processes, each a replica the
  controller records, each accepted by an agent once;
- the detectors and the forecaster go on from the last checkpoint: every series' learned
  sample count, and the forecaster's learned history, continue the checkpointed ones. The
  restarted controller's first checkpoint proves it: a controller started afresh learns at most
  one sample per series per snapshot of its host, so the sum over hosts of each host's largest
  series count can not exceed the telemetry messages it has taken in since its start (its own
  ``/metrics`` counter, read after that checkpoint); the restored controller's sum does;
- what the agents said while it was down is reconciled: the replica that became ready
  meanwhile is seen ready after the restart, and is neither deployed again nor replaced.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.client import LLMOpsError, LLMOpsHelper
from llm_ops_helper.controller.state import AUTOSCALE_FILE, DB_FILE, DETECTORS_FILE
from llm_ops_helper.localfleet import LocalFleet, openai_chat
from tests.faults.controller_kill_helpers import (
    detector_counts,
    durable_rows,
    forecaster_history,
    integrity,
    line_count,
    most_learned_per_host,
    replica_groups,
    replica_processes,
)
from tests.faults.fleetwatch import log_events, until
from tests.faults.test_broker_restart import TELEMETRY, metrics

AGENTS = 3
REPLICAS = 3
# Samples each host's busiest series has learned before the kill: more than a controller
# started afresh could learn from the snapshots it takes in before its first checkpoint.
LEARNED_BEFORE_KILL = 50
NEW_STARTUP_S = 6.0
DEPLOYMENT = "sim-chat"
TARGET = f"{DEPLOYMENT}@2"
SPEC: dict[str, Any] = {
    "gpu_memory_bytes": 16 << 30, "max_surge": 1, "max_unavailable": 0,
    # No canary hold: the rollout goes on as each new replica is ready.
    "rollback": {"observe_s": 0.0, "auto": True},
    # Advisory: the forecaster learns the load every interval, the replica count is the test's.
    "autoscale": {"mode": "advisory"}, "max_replicas": REPLICAS + 1,
}
CONTROLLER = {"state": {"checkpoint_interval_s": 1.0}, "autoscale": {"interval_s": 1.0},
              "deployments": {"reconcile_interval_s": 0.5}}


def status(helper: LLMOpsHelper) -> Any:
    try:
        return helper.status(DEPLOYMENT)
    except LLMOpsError as exc:
        raise OSError(str(exc)) from None


def agent_says(fleet: LocalFleet, replica: str, state: str) -> bool:
    """Whether an agent has logged ``replica`` entering ``state``."""
    return any(r.get("replica") == replica and r.get("state") == state
               for a in fleet.agents
               for r in log_events(a.daemon.log_path, "replica_state_changed"))


@dataclass
class Crash:
    """What the scenario saw, before the kill, in the crash's wreck and after the restart."""

    helper: LLMOpsHelper
    old_names: set[str]
    caught: str  # the new replica placed before the kill
    replicas_at_kill: list[tuple[str, str | None, str]]
    down_s: float
    answering_s: float
    rows: dict[str, dict[str, list[tuple[Any, ...]]]]
    integrity: tuple[str, str]
    checkpoint_age: dict[str, float]
    counts_saved: dict[str, int]
    history_saved: list[float]
    log_from: int
    restarted_at: float
    counts_first: dict[str, int]  # the restarted controller's first checkpoint
    ingested_first: float  # telemetry messages it had taken in, read after that checkpoint


async def kill_mid_rollout(fleet: LocalFleet, tmp_path: Path, new_card: dict[str, Any],
                           down_until: str) -> Crash:
    """Version 1 deployed and learned from, version 2 (``new_card``) rolled out; the
    controller SIGKILLed once the first new replica is placed, and started again once that
    replica's agent says it is ``down_until``."""
    controller = fleet.controller
    assert controller is not None
    state_dir = fleet.workdir / "controller-state"
    db, detectors, autoscale = (state_dir / DB_FILE, state_dir / DETECTORS_FILE,
                                state_dir / AUTOSCALE_FILE)
    helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
    v1 = write_model_card(tmp_path / f"{DEPLOYMENT}-1.toml", startup_s=0.2, itl_ms=1.0)
    first = await asyncio.to_thread(helper.deploy_model, str(v1), name=DEPLOYMENT,
                                    replicas=REPLICAS, timeout=120, **SPEC)
    assert first.version == f"{DEPLOYMENT}@1" and first.ready == REPLICAS
    await asyncio.to_thread(helper.set_alias, DEPLOYMENT, "stable", 1)
    # Learned state worth restoring: traffic, so that the forecaster learns a load that is
    # not 0, and a checkpoint with it and with detectors some samples in.
    urls = [e.url for e in helper.endpoints(DEPLOYMENT)]
    await asyncio.to_thread(lambda: [openai_chat(u, DEPLOYMENT, max_tokens=16)
                                     for _ in range(10) for u in urls])
    hosts = {a.host for a in fleet.agents}
    await until(lambda: any(forecaster_history(autoscale, DEPLOYMENT))
                and (m := most_learned_per_host(detector_counts(detectors))).keys() >= hosts
                and min(m[h] for h in hosts) >= LEARNED_BEFORE_KILL,
                90, "a checkpoint with learned detector and forecaster state")

    # Version 2, slow to start: the rollout places one new replica at a time.
    v2 = write_model_card(tmp_path / f"{DEPLOYMENT}-2.toml", itl_ms=1.0, **new_card)
    started = await asyncio.to_thread(helper.deploy_model, str(v2), name=DEPLOYMENT,
                                      replicas=REPLICAS, wait=False, **SPEC)
    assert started.version == TARGET
    placed = await until(lambda: [r for r in status(helper).replicas if r.version == TARGET],
                         30, "a first new replica")
    # Killed once the agent has the artifact (it downloads it from the controller's API) and
    # is starting the replica: what is left for the agent to do needs no controller.
    await until(lambda: agent_says(fleet, placed[0].name, "starting"), 30,
                f"{placed[0].name} starting on its agent")
    rows_before = await asyncio.to_thread(durable_rows, db)
    at_kill = status(helper)
    controller.signal(signal.SIGKILL)
    assert await controller.wait(10) == -signal.SIGKILL
    killed_at = time.time()
    assert len(placed) == 1, placed
    caught = placed[0].name
    assert not agent_says(fleet, caught, down_until), "too late: no news left for the restart"

    # The last checkpoint and the database, as the crash left them.
    saved = tmp_path / "checkpoint"
    saved.mkdir()
    shutil.copy2(detectors, saved / DETECTORS_FILE)
    shutil.copy2(autoscale, saved / AUTOSCALE_FILE)
    checkpoint_age = {f.name: round(killed_at - f.stat().st_mtime, 2)
                      for f in (saved / DETECTORS_FILE, saved / AUTOSCALE_FILE)}
    check = await asyncio.to_thread(integrity, db)
    rows_after_crash = await asyncio.to_thread(durable_rows, db)

    # While it is down, the replica it placed comes up (or fails).
    await until(lambda: agent_says(fleet, caught, down_until), 60,
                f"{caught} {down_until} on its agent")
    down_s = time.time() - killed_at

    log_from = line_count(controller.log_path)
    controller.start(fleet.env, fleet.parent_death)
    restarted_at = time.time()
    await until(lambda: status(helper), 60, "the controller's API after the restart")
    answering_s = time.time() - restarted_at

    def first_checkpoint() -> tuple[dict[str, int], float] | None:
        if detectors.stat().st_mtime <= restarted_at:
            return None
        counts = detector_counts(detectors)
        ingested = metrics(fleet).get(TELEMETRY)  # read after the checkpoint
        return None if ingested is None else (counts, ingested)

    counts_first, ingested_first = await until(
        first_checkpoint, 30, "the restarted controller's first detector checkpoint")
    rows_restarted = await asyncio.to_thread(durable_rows, db)
    return Crash(helper, {r.name for r in first.replicas}, caught,
                 [(r.name, r.version, r.state) for r in at_kill.replicas], down_s, answering_s,
                 {"before": rows_before, "crash": rows_after_crash,
                  "restarted": rows_restarted}, check, checkpoint_age,
                 detector_counts(saved / DETECTORS_FILE),
                 forecaster_history(saved / AUTOSCALE_FILE, DEPLOYMENT), log_from,
                 restarted_at, counts_first, ingested_first)


@dataclass
class Outcome:
    """The fleet once the rollout has settled after the restart."""

    final: Any
    settled_s: float
    counts_now: dict[str, int]
    history_now: list[float]
    events: list[dict[str, Any]]
    processes: Counter[str]
    accepted: Counter[str]
    restored: dict[str, list[dict[str, Any]]]


async def settle(fleet: LocalFleet, crash: Crash, version: str) -> Outcome:
    """Wait for the deployment to be available on ``version`` with every replica ready, and
    for a checkpoint from the restarted controller; read what the test judges."""
    assert fleet.controller is not None
    state_dir = fleet.workdir / "controller-state"
    detectors, autoscale = state_dir / DETECTORS_FILE, state_dir / AUTOSCALE_FILE
    final = await until(lambda: (d := status(crash.helper)).phase == "available"
                        and d.version == version and d.ready == REPLICAS
                        and len(d.replicas) == REPLICAS and d, 120,
                        f"{DEPLOYMENT} available on {version}")
    settled_s = time.time() - crash.restarted_at
    # A checkpoint written by the restarted controller, after it has learned more (the
    # forecaster learns once two snapshots of the replicas' counters give rates again).
    await until(lambda: detectors.stat().st_mtime > crash.restarted_at + 2
                and len(forecaster_history(autoscale, DEPLOYMENT)) > len(crash.history_saved),
                60, "a checkpoint from the restarted controller with more learned")
    history = await asyncio.to_thread(fleet.get, f"/api/v1/deployments/{DEPLOYMENT}/history")
    groups = replica_groups(fleet)
    log = fleet.controller.log_path
    return Outcome(
        final, settled_s, detector_counts(detectors),
        forecaster_history(autoscale, DEPLOYMENT), history["events"],
        Counter(groups.get(pgid, f"unknown pgid {pgid}")
                for pgid in replica_processes(fleet.env["LLMOPS_FAULT_MARK"]).values()),
        Counter(r["replica"] for a in fleet.agents
                for r in log_events(a.daemon.log_path, "replica_accepted")),
        {e: log_events(log, e, crash.log_from)
         for e in ("detectors_restored", "autoscale_restored")})


def report(crash: Crash, out: Outcome) -> None:
    learned = {k for k, n in crash.counts_saved.items() if n > 0} & out.counts_now.keys()
    print(f"\nkilled with replicas {crash.replicas_at_kill}; down {crash.down_s:.1f} s")
    print(f"after the restart: API {crash.answering_s:.1f} s, settled {out.settled_s:.1f} s; "
          f"replicas {sorted((r.name, r.version, r.state) for r in out.final.replicas)}")
    print(f"processes {dict(out.processes)}; accepted {dict(out.accepted)}")
    print(f"sqlite after the crash: {crash.integrity}; durable rows "
          f"{ {t: len(v) for t, v in crash.rows['crash'].items()} }")
    print(f"checkpoint age at the kill {crash.checkpoint_age} s; detectors: "
          f"{len(crash.counts_saved)} series, {sum(crash.counts_saved.values())} samples saved "
          f"-> {sum(out.counts_now[k] for k in learned)} after; forecaster history "
          f"{len(crash.history_saved)} -> {len(out.history_now)} values")
    first = most_learned_per_host(crash.counts_first, learned)
    print(f"first checkpoint after the restart: busiest series per host {first} (saved "
          f"{most_learned_per_host(crash.counts_saved, learned)}), sum {sum(first.values())} "
          f"against {crash.ingested_first:.0f} telemetry messages taken in since the restart")


def assert_intact_and_restored(fleet: LocalFleet, crash: Crash, out: Outcome) -> None:
    """The promises both outcomes share: registry and deployments intact, one process per
    replica and none of another, nothing deployed twice, learned state continued."""
    # The registry and the deployments are intact.
    assert crash.integrity == ("ok", "wal")
    rows = crash.rows
    assert rows["crash"] == rows["before"], rows
    # Every row is found again by the restarted controller (which may add a revision: a
    # rollback is one).
    assert all(set(v) <= set(rows["restarted"][t]) for t, v in rows["before"].items()), rows
    assert len(rows["before"]["registry_versions"]) == 2
    assert rows["before"]["registry_aliases"] == [(DEPLOYMENT, "stable", 1)]
    assert [r[1:] for r in rows["before"]["deployment_revisions"]] == [
        (1, f"{DEPLOYMENT}@1"), (2, TARGET)]
    # No duplicate replicas, no orphan: one process for each replica the controller has.
    final_names = {r.name for r in out.final.replicas}
    assert out.processes == Counter(final_names), (out.processes, final_names)
    assert set(out.accepted.values()) == {1}, f"a replica was deployed twice: {out.accepted}"
    # Detector and forecaster state continue the last checkpoint.
    assert [r["series"] for r in out.restored["detectors_restored"]] == [
        len(crash.counts_saved)]
    assert [r["deployments"] for r in out.restored["autoscale_restored"]] == [1]
    learned = {k for k, n in crash.counts_saved.items() if n > 0} & out.counts_now.keys()
    assert learned, "no learned detector series survived the restart"
    assert all(out.counts_now[k] >= crash.counts_saved[k] for k in learned), {
        k: (crash.counts_saved[k], out.counts_now[k]) for k in learned
        if out.counts_now[k] < crash.counts_saved[k]}
    # Restored, not learned again: right after the restart every saved series is there with
    # at least its saved count, and the counts add up to more than a controller started
    # afresh could have learned from the telemetry it had taken in.
    assert learned <= crash.counts_first.keys(), learned - crash.counts_first.keys()
    assert all(crash.counts_first[k] >= crash.counts_saved[k] for k in learned), {
        k: (crash.counts_saved[k], crash.counts_first[k]) for k in learned
        if crash.counts_first[k] < crash.counts_saved[k]}
    first = most_learned_per_host(crash.counts_first, learned)
    assert sum(first.values()) > crash.ingested_first, (
        f"the first checkpoint after the restart ({first}) is no more than a fresh start "
        f"could learn from {crash.ingested_first:.0f} snapshots")
    assert any(crash.history_saved), "no load learned before the kill"
    assert out.history_now[:len(crash.history_saved)] == crash.history_saved, \
        "the forecaster started afresh"
    assert len(out.history_now) > len(crash.history_saved)


def fault_fleet(tmp_path: Path) -> LocalFleet:
    return LocalFleet(tmp_path / "fleet", agents_count=AGENTS, gpus_per_agent=2,
                      gpu_profile="a100-sxm4-80gb", interval_s=0.5,
                      controller_overrides=CONTROLLER,
                      env={"LLMOPS_FAULT_MARK": uuid.uuid4().hex})


async def test_controller_sigkilled_mid_rollout_restarts_intact_and_resumes_without_duplicates(
        tmp_path: Path) -> None:
    """The controller SIGKILLed while a rolling update (max_surge 1, slow-starting new version)
    is half-way, and started again once the new replica it had placed is ready: the registry
    and deployments are intact (same rows, integrity_check ok); the rollout resumes to
    completion; exactly the desired replica processes run, all of the new version, none
    deployed twice; detector and forecaster state continue the last checkpoint; the replica
    that became ready while the controller was down is seen ready, not re-deployed."""
    async with fault_fleet(tmp_path) as fleet:
        crash = await kill_mid_rollout(fleet, tmp_path, {"startup_s": NEW_STARTUP_S}, "ready")
        seen = await until(lambda: next((r for r in status(crash.helper).replicas
                                         if r.name == crash.caught and r.state == "ready"),
                                        None), 30, f"{crash.caught} seen ready")
        seen_ready_s = time.time() - crash.restarted_at
        out = await settle(fleet, crash, TARGET)
    report(crash, out)
    print(f"{crash.caught}, ready while the controller was down, seen ready "
          f"{seen_ready_s:.1f} s after the restart")

    assert_intact_and_restored(fleet, crash, out)
    # The rollout resumed to completion on version 2, nothing of version 1 left.
    final_names = {r.name for r in out.final.replicas}
    assert {r.version for r in out.final.replicas} == {TARGET}
    assert not crash.old_names & final_names
    assert set(out.accepted) == crash.old_names | final_names
    kinds = [e["kind"] for e in out.events]
    assert kinds.count("rollout_completed") == 2 and "rollback_started" not in kinds, kinds
    # What the agent said while the controller was down is reconciled: the replica that
    # came up meanwhile is seen ready, kept, and recorded ready once.
    assert seen.state == "ready" and crash.caught in final_names, \
        "the replica that came up while the controller was down was replaced"
    assert len([e for e in out.events if e["kind"] == "replica_ready"
                and crash.caught in e["message"]]) == 1


async def test_controller_sigkilled_mid_rollout_rolls_back_a_version_that_failed_meanwhile(
        tmp_path: Path) -> None:
    """The controller SIGKILLed half-way through a rolling update whose new replica fails at
    start (automatic rollback configured), and started again once its agent has given that
    replica up: the failure reported while it was down is reconciled into the rollback,
    which completes on the old version's untouched replicas; the failed replica leaves no
    process behind, nothing is deployed twice, the registry and deployments are intact and
    detector and forecaster state continue the last checkpoint."""
    async with fault_fleet(tmp_path) as fleet:
        crash = await kill_mid_rollout(fleet, tmp_path,
                                       {"startup_s": 3.0, "exit_at_start": True}, "failed")
        out = await settle(fleet, crash, f"{DEPLOYMENT}@1")
    report(crash, out)

    assert_intact_and_restored(fleet, crash, out)
    # Rolled back to version 1: its three replicas, which kept serving, and nothing else.
    assert {r.name for r in out.final.replicas} == crash.old_names
    assert {r.version for r in out.final.replicas} == {f"{DEPLOYMENT}@1"}
    assert set(out.accepted) == crash.old_names | {crash.caught}
    kinds = [e["kind"] for e in out.events]
    assert kinds.count("rollback_started") == 1 and "rollback_completed" in kinds, kinds
