"""Load signals from replica snapshots: rates from counter deltas, restarts, windowed means."""

from __future__ import annotations

import pytest

from llm_ops_helper.controller.autoscale.signals import LoadTracker
from llm_ops_helper.proto.messages import Histogram, ReplicaSample


def sample(name: str, up: bool = True, ttft: tuple[float, float] | None = None,
           itl: tuple[float, float] | None = None, **metrics: float) -> ReplicaSample:
    histograms = {}
    if ttft is not None:
        histograms["ttft_seconds"] = Histogram(sum=ttft[0], count=ttft[1])
    if itl is not None:
        histograms["itl_seconds"] = Histogram(sum=itl[0], count=itl[1])
    return ReplicaSample(name=name, runtime="sim", up=up, metrics=metrics, histograms=histograms)


def counters(finished: float, prompt: float, generated: float, **more: float) -> dict[str, float]:
    return {"requests_finished_total": finished, "prompt_tokens_total": prompt,
            "generation_tokens_total": generated, **more}


def test_first_snapshot_has_gauges_but_no_rates() -> None:
    tracker = LoadTracker()
    load = tracker.update("chat", [
        (100.0, sample("a", **counters(10, 100, 200), requests_running=2, requests_waiting=1,
                       kv_cache_usage=0.3)),
        (100.0, sample("b", **counters(5, 50, 100), requests_running=1, requests_waiting=4,
                       kv_cache_usage=0.7))])
    assert load is not None
    assert not load.rates_known
    assert (load.replicas, load.requests_running, load.requests_waiting) == (2, 3, 5)
    assert load.kv_cache_usage == 0.7  # the fullest replica
    assert load.tokens_per_s == 0.0


def test_rates_are_summed_counter_deltas_over_each_replicas_own_clock() -> None:
    tracker = LoadTracker()
    tracker.update("chat", [(100.0, sample("a", **counters(10, 100, 200))),
                            (500.0, sample("b", **counters(0, 0, 0)))])
    load = tracker.update("chat", [(110.0, sample("a", **counters(30, 300, 600))),
                                   (505.0, sample("b", **counters(10, 50, 100)))])
    assert load is not None and load.rates_known
    assert load.requests_per_s == pytest.approx(20 / 10 + 10 / 5)
    assert load.prompt_tokens_per_s == pytest.approx(200 / 10 + 50 / 5)
    assert load.generation_tokens_per_s == pytest.approx(400 / 10 + 100 / 5)
    assert load.tokens_per_s == pytest.approx(60 + 30)


def test_a_counter_that_went_backwards_counts_from_zero() -> None:
    tracker = LoadTracker()
    tracker.update("chat", [(100.0, sample("a", **counters(1000, 10_000, 20_000)))])
    # The server restarted between the snapshots: its counters start again from zero.
    load = tracker.update("chat", [(110.0, sample("a", **counters(5, 40, 60)))])
    assert load is not None
    assert load.requests_per_s == pytest.approx(0.5)
    assert load.tokens_per_s == pytest.approx(10.0)
    # And from the new values on, deltas again.
    load = tracker.update("chat", [(120.0, sample("a", **counters(25, 140, 160)))])
    assert load is not None
    assert load.requests_per_s == pytest.approx(2.0)
    assert load.tokens_per_s == pytest.approx(20.0)


def test_no_new_snapshot_keeps_the_last_rates() -> None:
    tracker = LoadTracker()
    tracker.update("chat", [(100.0, sample("a", **counters(0, 0, 0)))])
    first = tracker.update("chat", [(110.0, sample("a", **counters(10, 100, 100)))])
    again = tracker.update("chat", [(110.0, sample("a", **counters(10, 100, 100)))])
    assert first == again


def test_latency_is_a_windowed_mean_from_histogram_sums_and_counts() -> None:
    tracker = LoadTracker()
    tracker.update("chat", [(100.0, sample("a", ttft=(10.0, 100), itl=(1.0, 1000))),
                            (100.0, sample("b", ttft=(0.0, 0), itl=(0.0, 0)))])
    load = tracker.update("chat", [
        (110.0, sample("a", ttft=(16.0, 110), itl=(3.0, 2000))),  # 10 more, mean 0.6 s
        (110.0, sample("b", ttft=(2.0, 10), itl=(2.0, 1000)))])   # 10 more, mean 0.2 s
    assert load is not None
    assert load.ttft_mean_s == pytest.approx(8.0 / 20)
    assert load.itl_mean_s == pytest.approx(4.0 / 2000)
    # A histogram reset by a restart counts from zero as counters do.
    load = tracker.update("chat", [(120.0, sample("a", ttft=(3.0, 10), itl=(0.5, 100))),
                                   (120.0, sample("b", ttft=(2.0, 10), itl=(2.0, 1000)))])
    assert load is not None
    assert load.ttft_mean_s == pytest.approx(3.0 / 10)


def test_without_requests_in_the_window_latency_is_unknown() -> None:
    tracker = LoadTracker()
    tracker.update("chat", [(100.0, sample("a", ttft=(1.0, 10)))])
    load = tracker.update("chat", [(110.0, sample("a", ttft=(1.0, 10)))])
    assert load is not None and load.ttft_mean_s is None and load.itl_mean_s is None


def test_no_replica_reporting_metrics_is_no_load() -> None:
    tracker = LoadTracker()
    assert tracker.update("chat", []) is None
    assert tracker.update("chat", [(100.0, sample("a", up=False, **counters(1, 1, 1))),
                                   (100.0, sample("b"))]) is None


def test_a_replica_that_left_takes_its_rates_with_it() -> None:
    tracker = LoadTracker()
    tracker.update("chat", [(100.0, sample("a", **counters(0, 0, 0))),
                            (100.0, sample("b", **counters(0, 0, 0)))])
    tracker.update("chat", [(110.0, sample("a", **counters(10, 0, 0))),
                            (110.0, sample("b", **counters(10, 0, 0)))])
    load = tracker.update("chat", [(110.0, sample("a", **counters(10, 0, 0)))])
    assert load is not None and load.requests_per_s == pytest.approx(1.0)
    # Back with the same name (a new process): a first snapshot again, no rate from before.
    load = tracker.update("chat", [(110.0, sample("a", **counters(10, 0, 0))),
                                   (120.0, sample("b", **counters(3, 0, 0)))])
    assert load is not None and load.requests_per_s == pytest.approx(1.0)


def test_the_p90_latency_is_the_worst_replicas_interval_p90() -> None:
    # Agents send each replica's percentiles over its last scrape interval; users of the
    # deployment wait on the slowest replica.
    load = LoadTracker().update("chat", [
        (100.0, sample("a", ttft_p90_seconds=0.2, itl_p90_seconds=0.03)),
        (100.0, sample("b", ttft_p90_seconds=0.7)),
        (100.0, sample("c", requests_running=1))])
    assert load is not None
    assert (load.ttft_p90_s, load.itl_p90_s) == (0.7, 0.03)
    none = LoadTracker().update("chat", [(100.0, sample("a", requests_running=1))])
    assert none is not None and (none.ttft_p90_s, none.itl_p90_s) == (None, None)
