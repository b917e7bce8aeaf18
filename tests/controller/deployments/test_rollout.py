"""The rollout planner as a pure function: rolling updates, scaling, failures, lost hosts."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from llm_ops_helper.controller.deployments.rollout import (
    ReplicaView,
    Timing,
    Totals,
    judge,
    plan,
)
from llm_ops_helper.controller.deployments.spec import DeploymentSpec, RollbackPolicy
from llm_ops_helper.controller.deployments.store import Deployment

NOW = 10_000.0
VERSIONS = {1: "tiny@1", 2: "tiny@2", 3: "tiny@1"}


def deployment(revision: int = 1, stable: int | None = 1, replicas: int = 2,
               observe_s: float = 0.0, auto: bool = True, **fields: Any) -> Deployment:
    spec = DeploymentSpec(model="tiny@1", replicas=replicas,
                          rollback=RollbackPolicy(observe_s=observe_s, auto=auto),
                          **{k: v for k, v in fields.items() if k in ("max_surge",
                                                                      "max_unavailable")})
    rest = {k: v for k, v in fields.items() if k not in ("max_surge", "max_unavailable")}
    return Deployment(name="chat", spec=spec, revision=revision, created_at=0.0,
                      updated_at=0.0, created_by="t", stable=stable, **rest)


def replica(name: str, revision: int = 1, state: str | None = "ready", host: str = "a",
            **fields: Any) -> ReplicaView:
    base: dict[str, Any] = dict(created_at=NOW - 100, sent_at=NOW - 100, observed=True,
                                reported_after_send=True, ever_ready=state == "ready")
    return ReplicaView(name=name, revision=revision, host=host, state=state, **(base | fields))


def names(pairs: list[tuple[str, str]]) -> list[str]:
    return sorted(n for n, _ in pairs)


# -- steady state -----------------------------------------------------------------------------


def test_first_deploy_creates_every_replica_at_once() -> None:
    p = plan(deployment(stable=None, replicas=3), [], VERSIONS, NOW)
    assert p.create == 3
    assert p.phase == "progressing"
    assert not p.completed


def test_first_deploy_completes_when_all_are_ready() -> None:
    d = deployment(stable=None)
    p = plan(d, [replica("a1"), replica("a2", host="b")], VERSIONS, NOW)
    assert p.completed and p.phase == "available"
    assert p.create == 0 and not p.drain and not p.stop
    assert p.message == "2/2 replicas of tiny@1 ready"


def test_scale_up_adds_only_what_is_missing() -> None:
    p = plan(deployment(replicas=4), [replica("a1"), replica("a2")], VERSIONS, NOW)
    assert p.create == 2
    assert p.phase == "progressing"


def test_scale_down_drains_with_spread_and_stops_not_ready_first() -> None:
    rs = [replica("a1", host="a"), replica("a2", host="a", created_at=NOW - 50),
          replica("b1", host="b"),
          replica("c1", host="c", state="starting", ever_ready=False, sent_at=NOW)]
    p = plan(deployment(replicas=2), rs, VERSIONS, NOW)
    assert names(p.stop) == ["c1"]  # serving nothing: no drain needed
    assert names(p.drain) == ["a2"]  # host a has two; the newer of them
    assert p.create == 0


def test_stable_deployment_short_of_ready_is_degraded_and_failed_one_is_replaced() -> None:
    rs = [replica("a1"), replica("a2", state="failed", reason="exited with code 9")]
    p = plan(deployment(replicas=2), rs, VERSIONS, NOW)
    assert p.failed == [("a2", "replica a2 on a failed: exited with code 9")]
    assert names(p.stop) == ["a2"]
    assert p.rollback is None and p.fail_rollout is None
    assert p.create == 1  # replaced: the version itself proved good
    assert p.phase == "progressing"


def test_short_of_ready_is_progressing_while_one_is_on_its_way_else_degraded() -> None:
    coming = replica("a3", state=None, reported_after_send=False, sent_at=NOW)
    rs = [replica("a1"), replica("a2", state="starting", ever_ready=True), coming]
    assert plan(deployment(replicas=3), rs, VERSIONS, NOW).phase == "progressing"
    p = plan(deployment(replicas=2), [replica("a1"), replica("a2", state="draining")],
             VERSIONS, NOW)
    assert p.phase == "degraded"
    assert p.message == "1/2 replicas of tiny@1 ready"


# -- rolling update ---------------------------------------------------------------------------


def _simulate(desired: int, surge: int, unavailable: int) -> list[str]:
    """Drive the planner through a whole rollout in a tiny world where a created replica is
    ready one step later and a drained one leaves at once; check the invariants every step."""
    d = deployment(revision=2, stable=1, replicas=desired, max_surge=surge,
                   max_unavailable=unavailable)
    world = {f"old{i}": replica(f"old{i}", host=f"h{i % 3}") for i in range(desired)}
    counter = itertools.count()
    log = []
    for step in range(100):
        world = {n: dataclasses.replace(r, state="ready", ever_ready=True)
                 if r.state == "starting" else r for n, r in world.items()}
        p = plan(d, list(world.values()), VERSIONS, NOW + step)
        assert p.rollback is None and not p.failed
        for name, _ in p.drain + p.stop:
            del world[name]
        ready = sum(1 for r in world.values() if r.state == "ready")
        assert ready >= desired - unavailable, f"step {step}: {ready} ready"
        for _ in range(p.create):
            name = f"new{next(counter)}"
            world[name] = replica(name, revision=2, state="starting", ever_ready=False,
                                  sent_at=NOW + step, created_at=NOW + step)
        assert len(world) <= desired + surge, f"step {step}: {len(world)} replicas"
        log.append(f"+{p.create} -{len(p.drain)}")
        if p.completed:
            assert all(r.revision == 2 and r.state == "ready" for r in world.values())
            assert len(world) == desired
            return log
    raise AssertionError(f"rollout did not complete: {log}")


@pytest.mark.parametrize(("desired", "surge", "unavailable"),
                         [(d, s, u) for d in range(1, 6) for s in range(3) for u in range(3)
                          if s + u > 0])
def test_rolling_update_keeps_availability_and_surge_bounds(desired: int, surge: int,
                                                             unavailable: int) -> None:
    _simulate(desired, surge, unavailable)


def test_surge_one_unavailable_zero_goes_one_at_a_time() -> None:
    assert _simulate(2, 1, 0) == ["+1 -0", "+1 -1", "+0 -1", "+0 -0"]


def test_surge_zero_unavailable_one_removes_before_adding() -> None:
    assert _simulate(2, 0, 1) == ["+1 -1", "+1 -1", "+0 -0"]


def test_old_replicas_that_are_not_ready_go_at_once() -> None:
    rs = [replica("o1"), replica("o2", state="starting", ever_ready=True)]
    p = plan(deployment(revision=2, stable=1), rs, VERSIONS, NOW)
    assert names(p.stop) == ["o2"]
    assert p.drain == []
    assert p.create == 2  # 1 old left + 2 new <= 2 + surge 1
    assert p.phase == "progressing"
    assert "rolling out tiny@2" in p.message


# -- failures and rollback --------------------------------------------------------------------


def test_new_replica_failing_rolls_back_automatically() -> None:
    rs = [replica("o1"), replica("o2"),
          replica("n1", revision=2, state="failed", ever_ready=False,
                  reason="exited at start with code 1: unknown flag --bogus")]
    p = plan(deployment(revision=2, stable=1), rs, VERSIONS, NOW)
    assert p.rollback == ("automatic rollback from tiny@2: replica n1 on a failed: "
                          "exited at start with code 1: unknown flag --bogus")
    assert names(p.stop) == ["n1"]
    assert p.create == 0 and p.drain == []
    assert p.phase == "rolling_back"


def test_agent_refusal_counts_as_failure() -> None:
    rs = [replica("o1"), replica("n1", revision=2, state=None, ever_ready=False,
                                 failed="agent on a refused replica n1: no runtime vllm")]
    p = plan(deployment(revision=2, stable=1, replicas=1), rs, VERSIONS, NOW)
    assert p.rollback is not None and p.rollback.endswith("no runtime vllm")


def test_controller_deadline_backstops_the_agent() -> None:
    new = replica("n1", revision=2, state="starting", ever_ready=False, deadline=NOW - 1)
    p = plan(deployment(revision=2, stable=1, replicas=1), [replica("o1"), new], VERSIONS, NOW)
    assert p.rollback is not None and "not ready 100 s after it was placed (last state: " \
        "starting)" in p.rollback
    # Before the deadline: nothing wrong.
    new = dataclasses.replace(new, deadline=NOW + 1)
    assert plan(deployment(revision=2, stable=1, replicas=1), [replica("o1"), new],
                VERSIONS, NOW).rollback is None


def test_first_deploy_failure_fails_without_retrying() -> None:
    rs = [replica("n1", state="failed", ever_ready=False, reason="exited with code 1"),
          replica("n2", state="starting", ever_ready=False)]
    d = deployment(stable=None)
    p = plan(d, rs, VERSIONS, NOW)
    assert p.fail_rollout == "replica n1 on a failed: exited with code 1"
    assert p.rollback is None
    assert names(p.stop) == ["n1"] and p.create == 0
    assert p.phase == "failed"
    assert p.message == "rollout of tiny@1 failed: replica n1 on a failed: exited with code 1"
    # Next pass, failed for good: nothing more is created for the missing replica.
    d.failed = p.fail_rollout
    p = plan(d, rs[1:], VERSIONS, NOW)
    assert p.create == 0 and p.phase == "failed" and p.fail_rollout is None


def test_without_auto_rollback_the_rollout_fails_and_old_ones_keep_serving() -> None:
    rs = [replica("o1"), replica("o2"), replica("n1", revision=2, state="failed",
                                                ever_ready=False, reason="crash loop")]
    p = plan(deployment(revision=2, stable=1, auto=False), rs, VERSIONS, NOW)
    assert p.rollback is None
    assert p.phase == "failed"
    assert p.message.endswith("; 2 old replicas keep serving")
    assert p.drain == [] and p.create == 0


def test_failure_while_rolling_back_fails_instead_of_looping() -> None:
    rs = [replica("n1", revision=3, state="failed", ever_ready=False, reason="gone")]
    p = plan(deployment(revision=3, stable=1, rolling_back=True, replicas=1), rs, VERSIONS, NOW)
    assert p.rollback is None and p.fail_rollout is not None
    assert p.phase == "failed"


def test_rollback_completes_when_old_version_is_back() -> None:
    rs = [replica("o1", revision=3), replica("o2", revision=3)]
    p = plan(deployment(revision=3, stable=1, rolling_back=True), rs, VERSIONS, NOW)
    assert p.completed and p.phase == "available"


# -- hosts lost, commands resent, draining ----------------------------------------------------


def test_replica_on_a_host_lost_past_grace_is_replaced() -> None:
    rs = [replica("a1", host="a"),
          replica("b1", host="b", host_online=False, offline_since=NOW - 61)]
    p = plan(deployment(), rs, VERSIONS, NOW, Timing(lost_grace_s=60))
    assert [(f.name, f.kind) for f in p.forget] == [("b1", "lost")]
    assert "host b offline for 61 s (grace 60 s)" in p.forget[0].why
    assert p.create == 1
    # Within grace: kept, not ready, not replaced.
    rs[1] = dataclasses.replace(rs[1], offline_since=NOW - 30)
    p = plan(deployment(), rs, VERSIONS, NOW, Timing(lost_grace_s=60))
    assert p.forget == [] and p.create == 0


def test_deploy_is_resent_when_the_agent_does_not_report_the_replica() -> None:
    quiet = replica("a1", state=None, ever_ready=False, sent_at=NOW - 11)
    assert plan(deployment(replicas=1), [quiet], VERSIONS, NOW, Timing(retry_s=10)).resend \
        == ["a1"]
    recent = dataclasses.replace(quiet, sent_at=NOW - 5)
    assert plan(deployment(replicas=1), [recent], VERSIONS, NOW, Timing(retry_s=10)).resend \
        == []
    offline = dataclasses.replace(quiet, host_online=False, offline_since=NOW - 1)
    assert plan(deployment(replicas=1), [offline], VERSIONS, NOW).resend == []


def test_drained_replica_is_forgotten_once_stopped_or_gone() -> None:
    d = deployment(replicas=1)
    keep = replica("a1")
    stopped = replica("a2", phase="draining", state="stopped")
    gone = replica("a3", phase="draining", state=None, reported_after_send=True)
    draining = replica("a4", phase="draining", state="draining", sent_at=NOW - 20)
    p = plan(d, [keep, stopped, gone, draining], VERSIONS, NOW)
    assert sorted(f.name for f in p.forget) == ["a2", "a3"]
    assert all(f.kind == "stopped" for f in p.forget)
    assert p.resend == [] and p.stop == []


def test_drain_is_resent_when_ignored_and_escalated_when_it_hangs() -> None:
    ignored = replica("a2", phase="draining", state="ready", sent_at=NOW - 11)
    assert plan(deployment(replicas=0), [ignored], VERSIONS, NOW).resend == ["a2"]
    hung = replica("a2", phase="draining", state="draining", sent_at=NOW - 100,
                   drain_timeout_s=30)
    p = plan(deployment(replicas=0), [hung], VERSIONS, NOW, Timing(retry_s=10))
    assert names(p.stop) == ["a2"]


def test_delete_drains_everything_then_removes() -> None:
    d = deployment(deleting=True)
    p = plan(d, [replica("a1"), replica("a2", state="starting", ever_ready=False)],
             VERSIONS, NOW)
    assert names(p.drain) == ["a1"] and names(p.stop) == ["a2"]
    assert not p.remove and p.phase == "deleting"
    assert plan(d, [], VERSIONS, NOW).remove


# -- canary -----------------------------------------------------------------------------------


def test_canary_holds_the_rollout_after_the_first_new_replica_is_ready() -> None:
    rs = [replica("o1"), replica("o2"), replica("n1", revision=2)]
    d = deployment(revision=2, stable=1, observe_s=30)
    p = plan(d, rs, VERSIONS, NOW)
    assert p.start_canary
    assert p.drain == [] and p.create == 0
    assert "observing the first new replica for 30 s" in p.message
    d.canary_started_at = NOW
    p = plan(d, rs, VERSIONS, NOW + 10)
    assert not p.start_canary and p.drain == [] and p.create == 0
    d.canary_done = True
    p = plan(d, rs, VERSIONS, NOW + 31)
    assert len(p.drain) == 1 and p.create == 1


def test_no_canary_while_rolling_back() -> None:
    rs = [replica("o1", revision=2), replica("n1", revision=3)]
    p = plan(deployment(revision=3, stable=1, observe_s=30, rolling_back=True, replicas=1),
             rs, VERSIONS, NOW)
    assert not p.start_canary and names(p.drain) == ["o1"]


def test_judge_needs_enough_requests() -> None:
    policy = RollbackPolicy(min_requests=20)
    assert judge(Totals(19, 0), Totals(100, 100), policy) is None
    assert judge(Totals(100, 0), Totals(19, 19), policy) is None


def test_judge_error_rate() -> None:
    policy = RollbackPolicy(error_rate_margin=0.05)
    assert judge(Totals(100, 1), Totals(100, 5), policy) is None
    verdict = judge(Totals(100, 1), Totals(100, 7), policy, "tiny@1", "tiny@2")
    assert verdict == ("error rate 7.0% on tiny@2 (7 of 100 requests) against 1.0% on tiny@1 "
                       "(margin 5.0%)")


def test_judge_ttft() -> None:
    policy = RollbackPolicy(ttft_ratio_margin=1.5)
    old = Totals(100, 0, ttft_sum=40.0, ttft_count=100)
    assert judge(old, Totals(50, 0, ttft_sum=29.0, ttft_count=50), policy) is None
    verdict = judge(old, Totals(50, 0, ttft_sum=31.0, ttft_count=50), policy, "a@1", "a@2")
    assert verdict == ("mean time to first token 0.620 s on a@2 against 0.400 s on a@1 "
                       "(limit 1.5x)")
    # No TTFT histogram on one side: only the error rate is judged.
    assert judge(old, Totals(50, 0), policy) is None


def test_totals_since_a_baseline_and_across_a_restart() -> None:
    now = Totals(150, 3, 15.0, 150)
    assert now.since(Totals(100, 1, 10.0, 100)) == Totals(50, 2, 5.0, 50)
    assert now.since(Totals(200, 0, 30.0, 200)) == now  # counters reset: all of it is new
    assert now.since(None) == now


def test_old_replica_on_a_host_that_is_away_is_left_alone_in_a_rollout() -> None:
    away = replica("o2", host="b", state="ready", host_online=False, offline_since=NOW - 5)
    p = plan(deployment(revision=2, stable=1), [replica("o1"), away], VERSIONS, NOW)
    assert p.stop == [] and p.drain == []
    assert p.create == 1  # within surge: 2 old + 1 new


def test_replicas_not_heard_of_since_start_get_no_decision() -> None:
    # After a controller restart, before telemetry: state unknown, not "not ready".
    unknown = {"state": None, "observed": False, "reported_after_send": False,
               "sent_at": NOW - 1000}
    old = [replica("o1", **unknown), replica("o2", host="b", **unknown)]
    p = plan(deployment(revision=2, stable=1), old, VERSIONS, NOW)
    assert (p.stop, p.drain, p.resend, p.create) == ([], [], [], 1)  # within the surge
    p = plan(deployment(replicas=1), old, VERSIONS, NOW)
    assert (p.stop, p.drain, p.resend) == ([], [], [])  # no scale-down victim either
    p = plan(deployment(deleting=True), old, VERSIONS, NOW)
    assert (p.stop, p.drain, p.remove) == ([], [], False)
    draining = [replica("d1", phase="draining", **unknown)]
    p = plan(deployment(), draining, VERSIONS, NOW)
    assert (p.stop, p.resend, p.forget) == ([], [], [])
