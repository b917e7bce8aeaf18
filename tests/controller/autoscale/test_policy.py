"""The scaling policy as a table: inputs and state in, desired count, rule and reason out."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest

from llm_ops_helper.controller.autoscale.policy import (
    Decision,
    PolicyConfig,
    PolicyInputs,
    PolicyState,
    decide,
    hpa,
    reactive,
)

CFG = PolicyConfig(min_replicas=1, max_replicas=10, target_utilization=0.8,
                   scale_down_window_s=300, cold_start_s=60, queue_per_replica=4)


def inputs(now: float = 0.0, current: int = 2, load: float | None = 800.0,
           upper: float | None = 800.0, **kw: object) -> PolicyInputs:
    base = PolicyInputs(now=now, current=current, ready=current, load_tokens_per_s=load,
                        forecast_point=upper, forecast_upper=upper, forecast_ok=True,
                        capacity_tokens_per_s=1000.0)
    return replace(base, **kw)  # type: ignore[arg-type]


def run(seq: list[PolicyInputs], config: PolicyConfig = CFG,
        policy: object = decide) -> list[Decision]:
    state, out = PolicyState(), []
    for i in seq:
        d, state = policy(i, config, state)  # type: ignore[operator]
        out.append(d)
    return out


@pytest.mark.parametrize(("kw", "desired", "rule"), [
    ({"upper": 800.0}, 1, "forecast"),            # 800 / (1000 * 0.8) = 1
    ({"upper": 801.0}, 2, "forecast"),
    ({"upper": 4000.0}, 5, "forecast"),
    ({"upper": 4000.0, "forecast_ok": False, "load": 1700.0}, 3, "reactive"),
    ({"upper": None, "load": 1700.0}, 3, "reactive"),
    ({"upper": 0.0}, 1, "min"),
    ({"upper": 1e6}, 10, "max"),
    ({"upper": 4000.0, "budget": 1}, 3, "budget"),
    ({"upper": 4000.0, "budget": 0}, 2, "budget"),
    ({"upper": 4000.0, "budget": 7}, 5, "forecast"),
    ({"upper": 800.0, "requests_waiting": 9.0}, 5, "queue"),  # 2 ready + ceil(9 / 4)
    ({"upper": 8000.0, "requests_waiting": 1.0}, 10, "forecast"),
    ({"metrics_ok": False}, 2, "no_metrics"),
    ({"load": None}, 2, "no_metrics"),
    ({"capacity_tokens_per_s": None}, 2, "no_metrics"),
])
def test_one_decision(kw: dict[str, object], desired: int, rule: str) -> None:
    d, _ = decide(inputs(**kw), CFG)  # type: ignore[arg-type]
    assert (d.desired, d.rule) == (desired, rule)
    assert d.apply


def test_reasons_are_one_sentence_with_the_figures() -> None:
    d, _ = decide(inputs(upper=4000.0, budget=1), CFG)
    assert d.reason == (
        "forecast upper bound 4,000 tokens/s 60 s ahead needs 5 replicas at 1,000 tokens/s each"
        " and 80% target utilisation; only 1 more can be placed on GPUs without open critical"
        " alerts, so 3 replicas: desired 3 (from 2)")
    d, _ = decide(inputs(metrics_ok=False, current=3), CFG)
    assert d.reason == "no metrics yet: holding 3 replicas"
    d, _ = decide(inputs(upper=4000.0, forecast_ok=False, load=100.0), CFG)
    assert "forecast not trusted" in d.reason and d.desired == 1


def test_no_metrics_leaves_state_untouched() -> None:
    state = PolicyState(((0.0, 4),))
    _, after = decide(inputs(now=10.0, metrics_ok=False), CFG, state)
    assert after is state


def test_hold_over_the_cold_start_window() -> None:
    # A forecast at t=0 needs 5 replicas; later forecasts need 1. The 5 stay for one cold start.
    cfg = replace(CFG, scale_down_window_s=0.0)
    # A forecast made one cold start ago was for the load of right now: still held at t=60.
    seq = [inputs(now=t, upper=4000.0 if t == 0 else 100.0) for t in (0, 20, 40, 60, 61, 80)]
    got = [(d.desired, d.rule) for d in run(seq, cfg)]
    assert got == [(5, "forecast"), (5, "hold"), (5, "hold"), (5, "hold"), (1, "forecast"),
                   (1, "forecast")]


def test_scale_down_stabilisation_is_max_over_the_window() -> None:
    cfg = replace(CFG, cold_start_s=0.0, scale_down_window_s=100.0)
    uppers = {0: 4000.0, 50: 2400.0}
    seq = [inputs(now=t, upper=uppers.get(t, 100.0)) for t in (0, 50, 99, 100, 149, 150)]
    got = [(d.desired, d.rule) for d in run(seq, cfg)]
    assert got == [(5, "forecast"), (5, "stabilisation"), (5, "stabilisation"),
                   (3, "stabilisation"), (3, "stabilisation"), (1, "forecast")]


def test_scale_up_is_immediate_despite_stabilisation() -> None:
    seq = [inputs(now=0, upper=100.0), inputs(now=5, upper=8000.0)]
    assert [d.desired for d in run(seq)] == [1, 10]


def test_state_keeps_only_the_longest_window() -> None:
    state = PolicyState()
    for t in range(0, 1000, 10):
        _, state = decide(inputs(now=float(t)), CFG, state)
    assert len(state.recommendations) == 31  # 690 ... 980 (from 990 - 300), plus 990
    assert state.recommendations[0][0] == 690.0


def test_reactive_ignores_the_forecast_and_has_no_memory() -> None:
    seq = [inputs(now=0, load=4000.0, upper=100.0), inputs(now=5, load=100.0, upper=8000.0)]
    got = [(d.desired, d.rule) for d in run(seq, policy=reactive)]
    assert got == [(5, "reactive"), (1, "reactive")]


def test_hpa_is_reactive_with_stabilisation() -> None:
    cfg = replace(CFG, scale_down_window_s=30.0)
    seq = [inputs(now=t, load=4000.0 if t == 0 else 100.0, upper=None) for t in (0, 29, 30)]
    got = [(d.desired, d.rule) for d in run(seq, cfg, policy=hpa)]
    assert got == [(5, "reactive"), (5, "stabilisation"), (1, "reactive")]


def test_modes() -> None:
    d, state = decide(inputs(upper=4000.0), replace(CFG, mode="off"))
    assert (d.desired, d.rule, d.apply, state) == (2, "off", False, PolicyState())
    d, _ = decide(inputs(upper=4000.0), replace(CFG, mode="advisory"))
    assert (d.desired, d.apply) == (5, False)
    assert d.reason.endswith("advisory mode, not applied")


@pytest.mark.parametrize("kw", [
    {"min_replicas": 3, "max_replicas": 2}, {"target_utilization": 0.0},
    {"target_utilization": 1.5}, {"cold_start_s": -1.0}, {"queue_per_replica": 0.0},
    {"mode": "auto"},
])
def test_bad_config_is_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        PolicyConfig(**kw)  # type: ignore[arg-type]


def test_decisions_and_state_pickle() -> None:
    d, state = decide(inputs(upper=4000.0), CFG)
    assert pickle.loads(pickle.dumps((d, state))) == (d, state)
