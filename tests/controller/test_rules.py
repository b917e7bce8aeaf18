from __future__ import annotations

from llm_ops_helper.controller.config import RulesConfig
from llm_ops_helper.controller.fleet import Fleet
from llm_ops_helper.controller.rules import (
    HostRuleState,
    event_condition,
    gpu_conditions,
    host_offline_condition,
    replica_conditions,
)
from llm_ops_helper.proto.messages import Event
from tests.controller.fixtures import gpu, replica, telemetry

RULES = RulesConfig(gpu_temperature_max_c=85.0, throttle_sustained_s=30.0,
                    replica_restarts_max=2, replica_startup_grace_s=60.0)


def rules_of(g, ts: float = 0.0, state: HostRuleState | None = None) -> list[str]:
    return [c.rule for c in gpu_conditions("h1", g, ts, state or HostRuleState(), RULES)]


def test_a_healthy_gpu_raises_nothing() -> None:
    assert rules_of(gpu(0)) == []


def test_temperature_over_the_limit_names_gpu_value_and_limit() -> None:
    [c] = gpu_conditions("h1", gpu(3, temperature_c=91.0), 0.0, HostRuleState(), RULES)
    assert (c.rule, c.gpu, c.value, c.severity) == ("gpu_temperature_high", 3, 91.0, "warning")
    assert c.summary == "GPU 3 at 91 C, above the 85 C limit"
    assert rules_of(gpu(3, temperature_c=85.0)) == []  # at the limit is not over it


def test_any_uncorrected_ecc_error_is_critical() -> None:
    [c] = gpu_conditions("h1", gpu(0, ecc_uncorrected_total=1), 0.0, HostRuleState(), RULES)
    assert c.rule == "gpu_ecc_uncorrected" and c.severity == "critical"
    assert rules_of(gpu(0, ecc_uncorrected_total=None)) == []  # ECC off: nothing to say


def test_a_lost_gpu_is_one_critical_condition_and_nothing_else() -> None:
    lost = gpu(0, healthy=False, error="GPU is lost", temperature_c=None)
    assert rules_of(lost) == ["gpu_unhealthy"]


def test_throttling_must_be_sustained_and_sw_power_cap_does_not_count() -> None:
    state = HostRuleState()
    hot = gpu(0, throttle_reasons=["hw_thermal_slowdown"])
    assert rules_of(hot, 0.0, state) == []
    assert rules_of(hot, 29.0, state) == []
    assert rules_of(hot, 30.0, state) == ["gpu_throttled"]
    assert rules_of(gpu(0), 31.0, state) == []  # it stopped: the clock starts again
    assert rules_of(hot, 32.0, state) == []
    capped = gpu(0, throttle_reasons=["sw_power_cap"])
    assert rules_of(capped, 0.0, state) == [] and rules_of(capped, 100.0, state) == []


def test_critical_xids_only() -> None:
    def xid(n: int) -> Event:
        return Event(host="h1", ts=5.0, kind="xid", gpu=2, data={"xid": n}, message=f"XID {n}")
    c = event_condition(xid(79), RULES)
    assert c is not None and (c.rule, c.gpu, c.series, c.severity) == (
        "gpu_xid", 2, "xid79", "critical")
    assert event_condition(xid(13), RULES) is None
    assert event_condition(Event(host="h1", ts=1.0, kind="gpu_recovered"), RULES) is None
    assert event_condition(Event(host="h1", ts=1.0, kind="xid", data={"xid": "79"}),
                           RULES) is None


def test_host_offline_alerts_for_lost_and_stale_not_for_a_clean_stop() -> None:
    assert host_offline_condition("h1", "lost") is not None
    assert host_offline_condition("h1", "stale") is not None
    assert host_offline_condition("h1", "shutdown") is None


def test_replica_down_waits_out_start_up_and_restarts_repeatedly_alert() -> None:
    fleet = Fleet()
    fleet.apply_telemetry(telemetry(seq=1, ts=0.0, replicas=[replica(up=False)]), 0, 0)
    host = fleet.hosts["h1"]
    assert replica_conditions(host, 30.0, RULES) == []  # still starting: silenced
    assert [c.rule for c in replica_conditions(host, 61.0, RULES)] == ["replica_down"]
    for seq, (ts, up) in enumerate([(70, True), (80, False), (90, True), (100, False),
                                    (110, True)], start=2):
        fleet.apply_telemetry(telemetry(seq=seq, ts=float(ts), replicas=[replica(up=up)]), 0, 0)
    [c] = replica_conditions(host, 110.0, RULES)
    assert c.rule == "replica_restarting" and c.value == 2.0 and c.replica == "r0"
    assert replica_conditions(host, 110.0 + 601, RULES) == []  # out of the window, and up
