"""Capacity per replica learned from observation: a lower bound when the SLO holds under load,
an upper bound when it is violated, bounded steps."""

from __future__ import annotations

import dataclasses

import pytest

from llm_ops_helper.controller.autoscale.capacity import Slo, learn
from llm_ops_helper.controller.autoscale.signals import Load

SLO = Slo(ttft_s=0.5, itl_s=0.05)


def load(tokens_per_s: float, waiting: float = 0.0, ttft: float | None = 0.2,
         itl: float | None = 0.02, kv: float | None = 0.3) -> Load:
    return Load(replicas=2, requests_per_s=1.0, failed_per_s=0.0, prompt_tokens_per_s=0.0,
                generation_tokens_per_s=tokens_per_s, requests_running=2.0,
                requests_waiting=waiting, kv_cache_usage=kv, ttft_mean_s=ttft, itl_mean_s=itl,
                rates_known=True)


def test_busy_within_the_slo_raises_the_estimate_towards_what_was_sustained() -> None:
    e = learn(100.0, load(300.0, waiting=3), ready=2, slo=SLO)  # 150 per replica
    assert e.tokens_per_s == 125.0  # one bounded step (25 %)
    assert e.moved.startswith("raised")
    e = learn(e.tokens_per_s, load(300.0, waiting=3), ready=2, slo=SLO)
    assert e.tokens_per_s == 150.0  # never above what was observed


def test_a_full_kv_cache_counts_as_busy() -> None:
    assert learn(100.0, load(240.0, kv=0.95), ready=2, slo=SLO).tokens_per_s == 120.0


def test_idle_replicas_meeting_the_slo_teach_nothing() -> None:
    e = learn(100.0, load(300.0), ready=2, slo=SLO)
    assert e.tokens_per_s == 100.0 and "not busy" in e.moved


def test_a_violated_slo_lowers_the_estimate_towards_what_was_served() -> None:
    e = learn(100.0, load(180.0, ttft=0.9), ready=2, slo=SLO)  # 90 per replica
    assert e.tokens_per_s == 90.0
    assert e.moved.startswith("lowered") and "TTFT mean 0.9 s > SLO 0.5 s" in e.moved
    e = learn(100.0, load(20.0, itl=0.08), ready=2, slo=SLO)  # 10 per replica: bounded step
    assert e.tokens_per_s == 75.0


def test_a_violation_above_the_estimate_changes_nothing() -> None:
    e = learn(100.0, load(400.0, ttft=2.0), ready=2, slo=SLO)
    assert e.tokens_per_s == 100.0 and e.moved.startswith("kept")


@pytest.mark.parametrize("window", [load(0.0), load(300.0, waiting=5, ttft=None, itl=None)])
def test_no_traffic_or_no_latency_keeps_the_estimate(window: Load) -> None:
    assert learn(100.0, window, ready=2, slo=SLO).tokens_per_s == 100.0


def test_no_ready_replica_keeps_the_estimate() -> None:
    assert learn(100.0, load(300.0, waiting=5), ready=0, slo=SLO).tokens_per_s == 100.0


def test_the_slo_is_judged_on_the_p90_where_agents_report_it() -> None:
    # Mean 0.2 s is well inside a 0.5 s SLO, but one request in ten waits 0.8 s: violated.
    slow_tail = dataclasses.replace(load(180.0), ttft_p90_s=0.8)
    e = learn(100.0, slow_tail, ready=2, slo=SLO)
    assert e.moved.startswith("lowered") and "TTFT p90 0.8 s > SLO 0.5 s" in e.moved
    fine_tail = dataclasses.replace(load(300.0, waiting=3, ttft=0.9), ttft_p90_s=0.4)
    assert learn(100.0, fine_tail, ready=2, slo=SLO).moved.startswith("raised")
