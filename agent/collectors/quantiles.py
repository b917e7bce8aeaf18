"""Latency percentiles over each scrape interval, computed where the buckets are.

A replica's TTFT and inter-token latency come as cumulative Prometheus histograms. The
controller keeps only their sum and count (decoding every bucket of every replica of 2,000
hosts cost 40 % of ingest), which gives means, not percentiles. Here, between two scrapes of
the same replica, the bucket deltas are this interval's histogram, and ``histogram_quantile``'s
linear interpolation (Prometheus' own rule) turns them into p50 / p90 / p99, sent as plain
metrics: ``ttft_p90_seconds``, ``itl_p99_seconds``, ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final

from llm_ops_helper.proto.messages import Histogram

QUANTILES: Final = ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"))
# Canonical histogram -> the prefix of its percentile metrics.
WINDOWED: Final = {"ttft_seconds": "ttft", "itl_seconds": "itl"}


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]],
                       total: float) -> float | None:
    """The q-quantile of a histogram given as cumulative (upper bound, count) pairs, ascending
    and finite (``total`` is the implicit +Inf bucket). None when it holds no observation.

    As Prometheus: linear interpolation inside the bucket that holds the rank, the first
    bucket starting at 0; a rank in the +Inf bucket answers the highest finite bound.
    """
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if not math.isfinite(bound):  # the +Inf bucket, if a caller kept it: it is ``total``
            break
        if count >= rank:
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound if lower_count > 0 or buckets else None


def interval(before: Histogram | None, now: Histogram) -> Histogram | None:
    """What ``now`` added since ``before``: the histogram of one scrape interval.

    No earlier scrape: None (a first scrape's counts are the replica's whole life). Counts
    that went backwards (the server restarted): everything since the restart. Bounds that
    changed: None.
    """
    if before is None:
        return None
    if now.count < before.count:
        return now
    if [b for b, _ in before.buckets] != [b for b, _ in now.buckets]:
        return None
    return Histogram(sum=now.sum - before.sum, count=now.count - before.count,
                     buckets=[(b, c - cb) for (b, c), (_, cb) in zip(now.buckets, before.buckets,
                                                                     strict=True)])


def interval_percentiles(before: Mapping[str, Histogram],
                         now: Mapping[str, Histogram]) -> dict[str, float]:
    """``{ttft_p50_seconds: ..., itl_p99_seconds: ...}`` for this interval's observations;
    a histogram with none in the interval gives nothing (absent, not 0)."""
    out: dict[str, float] = {}
    for name, prefix in WINDOWED.items():
        current = now.get(name)
        if current is None:
            continue
        window = interval(before.get(name), current)
        if window is None:
            continue
        for q, label in QUANTILES:
            value = histogram_quantile(q, window.buckets, window.count)
            if value is not None:
                out[f"{prefix}_{label}_seconds"] = value
    return out
