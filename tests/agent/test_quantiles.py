"""Interval percentiles from cumulative histograms, checked against Prometheus'
``histogram_quantile`` rule and against real pages scraped twice."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llm_ops_helper.agent.collectors.quantiles import (
    histogram_quantile,
    interval,
    interval_percentiles,
)
from llm_ops_helper.agent.collectors.runtime import parse_metrics
from llm_ops_helper.proto.messages import Histogram

BUCKETS = [(0.1, 10.0), (0.5, 60.0), (1.0, 90.0)]  # cumulative; 100 in all: 10 above 1.0


@pytest.mark.parametrize(("q", "expected"), [
    (0.05, 0.05),        # rank 5 in the first bucket, interpolated from 0
    (0.1, 0.1),          # exactly the first bucket's top
    (0.5, 0.42),         # rank 50 in (0.1, 0.5]: 0.1 + 0.4 * 40/50
    (0.9, 1.0),
    (0.99, 1.0),         # in the +Inf bucket: the highest finite bound, as Prometheus says
])
def test_histogram_quantile_interpolates_like_prometheus(q: float, expected: float) -> None:
    assert histogram_quantile(q, BUCKETS, 100.0) == pytest.approx(expected)


def test_empty_histograms_have_no_quantile() -> None:
    assert histogram_quantile(0.5, BUCKETS, 0.0) is None
    assert histogram_quantile(0.5, [], 0.0) is None
    assert histogram_quantile(0.5, [(0.1, 5.0), (math.inf, 5.0)], 5.0) == pytest.approx(0.05)


def test_interval_is_the_difference_and_a_restart_counts_from_zero() -> None:
    before = Histogram(sum=10.0, count=50.0, buckets=[(0.1, 20.0), (1.0, 50.0)])
    now = Histogram(sum=12.0, count=60.0, buckets=[(0.1, 30.0), (1.0, 60.0)])
    assert interval(before, now) == Histogram(sum=2.0, count=10.0,
                                              buckets=[(0.1, 10.0), (1.0, 10.0)])
    restarted = Histogram(sum=1.0, count=4.0, buckets=[(0.1, 4.0), (1.0, 4.0)])
    assert interval(before, restarted) == restarted
    assert interval(None, now) is None
    assert interval(before, Histogram(sum=0, count=70.0, buckets=[(0.2, 70.0)])) is None


def test_two_scrapes_of_a_real_vllm_page_give_this_intervals_percentiles() -> None:
    text = (Path(__file__).parents[1] / "fixtures" / "metrics" / "vllm.txt").read_text()
    _, first = parse_metrics(text, "vllm")
    assert interval_percentiles({}, first) == {}  # no earlier scrape: no interval yet
    # The same page again: nothing new in the interval, so no percentile (absent, not 0).
    assert interval_percentiles(first, first) == {}
    # Ten more requests, all with a time to first token in the first bucket above 0.25 s.
    ttft = first["ttft_seconds"]
    moved = Histogram(sum=ttft.sum + 3.0, count=ttft.count + 10, buckets=[
        (b, c + (10 if b > 0.25 else 0)) for b, c in ttft.buckets])
    out = interval_percentiles(first, {**first, "ttft_seconds": moved})
    low = max(b for b, _ in ttft.buckets if b <= 0.25)
    high = min(b for b, _ in ttft.buckets if b > 0.25)
    assert set(out) == {"ttft_p50_seconds", "ttft_p90_seconds", "ttft_p99_seconds"}
    assert low < out["ttft_p50_seconds"] < out["ttft_p90_seconds"] <= high
