"""The autoscaler's budget, from GPUs and open alerts, as the pure functions that make it.

The budget handed to :func:`policy.decide` is "how many more replicas the fleet could place
now". ``Autoscaler._budget`` (controller/autoscale/autoscaler.py) reads the engine's fleet,
firing alerts and ledger, then counts it with two pure functions of the scheduler: `host_view`
(a host's telemetry and status plus the alerts -> GPUs, each marked with the open critical
alert that bars it) and `place` (those views -> a placement). `budget` below is that count,
with the reading from the engine left out; these tests put GPUs and alerts in and check which
GPUs the budget counts. The same, through the engine, is
tests/controller/autoscale/test_autoscaler.py::test_gpus_with_an_open_critical_alert_are_not_in_the_budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from llm_ops_helper.controller.autoscale.policy import PolicyConfig, PolicyInputs, decide
from llm_ops_helper.controller.deployments.scheduler import (
    CRITICAL_GPU_RULES,
    PlacementRequest,
    host_view,
    place,
)
from llm_ops_helper.controller.fleet import HostState
from llm_ops_helper.proto.messages import Alert, Status
from tests.controller.fixtures import telemetry

GIB = 1 << 30
# Each GPU of the fixture telemetry has 60 GiB free of 80: one replica of 50 GiB fits on each.
REPLICA_GIB = 50
HOSTS = ("h1", "h2")  # two GPUs each: four replicas fit on a fleet with no alert


def fleet() -> list[HostState]:
    return [HostState(host, online=True, telemetry=telemetry(host, gpus=2),
                      status=Status(host=host, state="online", ts=1000.0, run_id="run1",
                                    interval_s=1.0, runtimes=["sim"]))
            for host in HOSTS]


def alert(rule: str, host: str, gpu: int | None, *, severity: str = "critical",
          state: str = "firing", replica: str | None = None) -> Alert:
    return Alert(id=f"{rule}-{host}-{gpu}", key=f"{rule}|{host}|{gpu}|{replica}",
                 state=state, severity=severity, rule=rule, host=host, gpu=gpu,  # type: ignore[arg-type]
                 replica=replica, summary=f"{rule} on {host} GPU {gpu}", ts=1000.0)


def placed(alerts: Sequence[Alert], wanted: int = 10) -> list[tuple[str, tuple[int, ...]]]:
    """Where the replicas the budget counts would go: host and GPUs of each."""
    views = [host_view(state, alerts) for state in fleet()]
    request = PlacementRequest("chat", "sim", 1, REPLICA_GIB * GIB, wanted)
    return [(p.host, p.gpus) for p in place(request, views).placed]


def budget(alerts: Sequence[Alert], wanted: int = 10) -> int:
    return len(placed(alerts, wanted))


ALL_FOUR = [("h1", (0,)), ("h1", (1,)), ("h2", (0,)), ("h2", (1,))]


def test_without_alerts_every_gpu_that_fits_is_in_the_budget() -> None:
    assert sorted(placed([])) == ALL_FOUR
    assert budget([], wanted=3) == 3  # never more than the policy could still add


@pytest.mark.parametrize("rule", sorted(CRITICAL_GPU_RULES))
def test_a_gpu_with_an_open_critical_alert_is_left_out(rule: str) -> None:
    assert sorted(placed([alert(rule, "h1", 0)])) == [("h1", (1,)), ("h2", (0,)), ("h2", (1,))]


def test_a_critical_alert_naming_no_gpu_leaves_out_every_gpu_of_its_host() -> None:
    # An XID the driver did not attribute to a GPU: no GPU of that host can be trusted.
    assert sorted(placed([alert("gpu_xid", "h2", None)])) == [("h1", (0,)), ("h1", (1,))]


def test_critical_alerts_on_every_gpu_leave_a_budget_of_zero() -> None:
    alerts = [alert("gpu_ecc_uncorrected", host, gpu) for host in HOSTS for gpu in (0, 1)]
    assert budget(alerts) == 0


def test_alerts_that_are_not_critical_leave_the_gpu_in() -> None:
    alerts = [alert("gpu_temperature_high", "h1", 0, severity="warning"),
              alert("gpu_throttled", "h1", 1, severity="warning"),
              alert("replica_down", "h2", None, severity="warning", replica="chat-r1-a")]
    assert sorted(placed(alerts)) == ALL_FOUR


def test_critical_alerts_about_something_other_than_a_gpu_leave_the_gpus_in() -> None:
    # A replica in a crash loop says the model is bad, not the GPU under it; host_offline is
    # critical, but a host back online is in (an offline one is out for being offline).
    alerts = [alert("replica_restarting", "h1", None, replica="chat-r1-a"),
              alert("host_offline", "h2", None)]
    assert sorted(placed(alerts)) == ALL_FOUR


def test_a_resolved_critical_alert_no_longer_leaves_its_gpu_out() -> None:
    alerts = [alert("gpu_xid", "h1", 0, state="resolved"),
              alert("gpu_unhealthy", "h2", None, state="resolved")]
    assert sorted(placed(alerts)) == ALL_FOUR


def test_an_alert_on_one_host_does_not_touch_the_same_gpu_of_another() -> None:
    assert sorted(placed([alert("gpu_xid", "h1", 1)])) == [("h1", (0,)), ("h2", (0,)),
                                                            ("h2", (1,))]


def test_the_policy_scales_up_only_as_far_as_gpus_without_critical_alerts_allow() -> None:
    # Demand for 6 replicas, 1 running: 5 more wanted, and 4 GPUs fit one each.
    config = PolicyConfig(min_replicas=1, max_replicas=10, target_utilization=1.0)
    demand = PolicyInputs(now=0.0, current=1, ready=1, load_tokens_per_s=6000.0,
                          forecast_point=6000.0, forecast_upper=6000.0, forecast_ok=True,
                          capacity_tokens_per_s=1000.0)
    healthy, _ = decide(replace(demand, budget=budget([], 5)), config)
    assert (healthy.desired, healthy.rule) == (5, "budget")
    alerts = [alert("gpu_xid", "h1", None), alert("gpu_temperature_high", "h2", 0,
                                                  severity="warning")]
    barred, _ = decide(replace(demand, budget=budget(alerts, 5)), config)
    assert (barred.desired, barred.rule) == (3, "budget")
    assert ("only 2 more can be placed on GPUs without open critical alerts, so 3 replicas"
            in barred.reason), barred.reason

