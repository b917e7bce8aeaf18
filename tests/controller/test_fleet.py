from __future__ import annotations

import msgspec

from llm_ops_helper.controller.fleet import Fleet, Transition
from llm_ops_helper.proto.messages import ReplicaSample
from llm_ops_helper.proto.sequence import Verdict
from tests.controller.fixtures import replica, status, telemetry


def test_online_from_telemetry_offline_when_stale_back_when_it_returns() -> None:
    fleet = Fleet(stale_after_intervals=3)
    verdict, t = fleet.apply_telemetry(telemetry(seq=1), now=0.0, wall=1000.0)
    assert verdict is Verdict.FRESH and t == Transition("h1", True)
    assert fleet.sweep(now=2.9, wall=1002.9) == []
    assert fleet.sweep(now=3.1, wall=1003.1) == [Transition("h1", False, "stale")]
    assert fleet.sweep(now=9.0, wall=1009.0) == []  # said once
    assert fleet.hosts["h1"].offline_reason == "stale"
    _, t = fleet.apply_telemetry(telemetry(seq=2, ts=1010.0), now=10.0, wall=1010.0)
    assert t == Transition("h1", True) and fleet.hosts["h1"].online


def test_staleness_follows_each_hosts_own_interval() -> None:
    fleet = Fleet(stale_after_intervals=3)
    fleet.apply_telemetry(telemetry(host="fast", interval_s=1.0), now=0.0, wall=0.0)
    fleet.apply_telemetry(telemetry(host="slow", interval_s=10.0), now=0.0, wall=0.0)
    assert [t.host for t in fleet.sweep(now=5.0, wall=5.0)] == ["fast"]


def test_status_will_and_clean_stop_keep_their_reason() -> None:
    fleet = Fleet()
    assert fleet.apply_status(status(), now=0.0, wall=0.0) == Transition("h1", True)
    lost = fleet.apply_status(status(state="offline", reason="lost"), now=1.0, wall=1.0)
    assert lost == Transition("h1", False, "lost")
    fleet.apply_status(status(host="h2"), now=0.0, wall=0.0)
    done = fleet.apply_status(status(host="h2", state="offline", reason="shutdown"), 1.0, 1.0)
    assert done == Transition("h2", False, "shutdown")
    assert fleet.counts() == {"online": 0, "offline": 2}


def test_a_will_after_staleness_refines_the_reason_without_a_second_transition() -> None:
    fleet = Fleet()
    fleet.apply_telemetry(telemetry(), now=0.0, wall=0.0)
    fleet.sweep(now=10.0, wall=10.0)
    assert fleet.apply_status(status(state="offline", reason="lost"), 11.0, 11.0) is None
    assert fleet.hosts["h1"].offline_reason == "lost"


def test_duplicates_change_nothing_and_late_ones_do_not_replace_the_snapshot() -> None:
    fleet = Fleet()
    fleet.apply_telemetry(telemetry(seq=1), 0.0, 0.0)
    fleet.apply_telemetry(telemetry(seq=3, ts=1003.0), 1.0, 1.0)
    assert fleet.seq.missing("h1") == 1
    verdict, _ = fleet.apply_telemetry(telemetry(seq=3, ts=1003.0), 1.1, 1.1)
    assert verdict is Verdict.DUPLICATE
    verdict, _ = fleet.apply_telemetry(telemetry(seq=2, ts=1002.0), 1.2, 1.2)
    assert verdict is Verdict.LATE and fleet.hosts["h1"].telemetry.seq == 3
    assert fleet.seq.missing("h1") == 0 and fleet.hosts["h1"].messages == 3


def test_replica_restarts_are_counted_from_up_again_and_from_counter_resets() -> None:
    fleet = Fleet()
    fleet.apply_telemetry(telemetry(seq=1, replicas=[replica(up=False)]), 0, 0)
    # Coming up for the first time is a start, not a restart.
    fleet.apply_telemetry(telemetry(seq=2, ts=1001.0, replicas=[replica()]), 1, 1)
    r = fleet.hosts["h1"].replicas["r0"]
    assert r.up and len(r.restarts) == 0
    fleet.apply_telemetry(telemetry(seq=3, ts=1002.0, replicas=[replica(up=False)]), 2, 2)
    fleet.apply_telemetry(telemetry(seq=4, ts=1003.0, replicas=[replica()]), 3, 3)
    assert list(r.restarts) == [1003.0] and r.started_at == 1003.0
    # Counters going backwards while it stayed up: it restarted between two scrapes.
    fleet.apply_telemetry(telemetry(seq=5, ts=1004.0, replicas=[
        replica(requests_finished_total=3.0)]), 4, 4)
    assert list(r.restarts) == [1003.0, 1004.0]
    fleet.apply_telemetry(telemetry(seq=6, ts=1005.0, replicas=[]), 5, 5)
    assert fleet.hosts["h1"].replicas == {}


def supervised(restarts: int, up: bool = True, **metrics: float) -> ReplicaSample:
    return msgspec.structs.replace(replica(up=up, **metrics), restarts=restarts)


def test_restarts_the_agent_counted_between_two_snapshots_are_counted_once_each() -> None:
    fleet = Fleet()
    fleet.apply_telemetry(telemetry(seq=1, replicas=[supervised(1)]), 0, 0)
    r = fleet.hosts["h1"].replicas["r0"]
    assert len(r.restarts) == 0  # restarts before the controller saw it are not new
    # Up in both snapshots with counters no lower: only the agent's count says it restarted.
    fleet.apply_telemetry(telemetry(seq=2, ts=1001.0, replicas=[supervised(3)]), 1, 1)
    assert list(r.restarts) == [1001.0, 1001.0] and r.started_at == 1001.0
    # Down (the agent counts the restart as it schedules it), then up again: one restart.
    fleet.apply_telemetry(telemetry(seq=3, ts=1002.0, replicas=[supervised(4, up=False)]), 2, 2)
    assert len(r.restarts) == 2
    fleet.apply_telemetry(telemetry(seq=4, ts=1003.0, replicas=[supervised(4)]), 3, 3)
    assert list(r.restarts) == [1001.0, 1001.0, 1003.0]
    # An agent that lost its state counts from 0 again: nothing new, and counting resumes.
    fleet.apply_telemetry(telemetry(seq=5, ts=1004.0, replicas=[supervised(0)]), 4, 4)
    fleet.apply_telemetry(telemetry(seq=6, ts=1005.0, replicas=[supervised(1)]), 5, 5)
    assert list(r.restarts) == [1001.0, 1001.0, 1003.0, 1005.0]
