"""Pattern memory: which short shapes has this series already shown?

Point features cannot tell a recurring shape (a nightly batch job, a daily traffic peak) from
a novel one: both are far from the mean. HTM, ARTime and contextOSE, the strongest detectors
on NAB, win by remembering *contexts*. This is the cheapest form of that idea that fits 100k
series in numpy:

* Each value is quantised into one of `BINS` bins of `BIN_WIDTH` slow standard deviations
  around the slow mean (values beyond three deviations share the two open outer bins). One
  deviation per bin: a daily shape's two levels sit one to two deviations either side of
  its mean, so they land in distinct, stable bins while noise within a level mostly does not
  cross a bin edge.
* A context is the last `CONTEXT` bins. The context's first ``CONTEXT - 1`` bins (its
  *history*) pick one byte of a per-series table, and its last bin one bit of that byte: the
  table is an exact set of the contexts seen (no hashing, no false positives), 512 bytes per
  series, and one byte says which bins have followed a history — which is also what the
  memory *expected* when a context is new.
* Novelty is judged against the series' own rate of novel contexts: a noisy series keeps
  meeting new contexts and calibrates itself; a periodic one stops, and then a few novel
  contexts in a row are strong evidence (a Poisson tail, see `novelty_tail`).

The memory never forgets: a context seen once stays known. That is the point for recurring
shapes; a drifting series that fills its table stops producing pattern evidence, and its
point features still watch it.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from llm_ops_helper.controller.analytics.ops import ByteArray, IntArray, Ops

BINS = 8
"""Bins per value: one byte holds a history's successors."""
CONTEXT = 4
"""Values per context: a history of three bins and the current one (4096 contexts)."""
BIN_WIDTH = 1.0
"""Bin width in slow standard deviations: 8 bins span the central +-4 deviations."""
TABLE_BYTES = BINS ** (CONTEXT - 1)
"""Bytes of pattern memory per series: one per history."""


class PatternMemory(Protocol):
    """Read access to the pattern table of the series being scored."""

    def successors(self, history: Any) -> Any:
        """The byte of bins seen after ``history``: bit b is set if bin b has followed it."""


class BatchMemory:
    """The bank's view: rows ``slots`` of the (series, history) byte table."""

    def __init__(self, table: ByteArray, slots: IntArray) -> None:
        self.table = table
        self.slots = slots

    def successors(self, history: Any) -> Any:
        return self.table[self.slots, history].astype(np.int64)


class RowMemory:
    """One series' view (`OnlineDetector`): its own row of the table."""

    def __init__(self, row: ByteArray) -> None:
        self.row = row

    def successors(self, history: Any) -> Any:
        return int(self.row[history])


def _nearest_table() -> IntArray:
    """``_NEAREST[mask, b]``: the set bit of ``mask`` nearest to ``b`` (lower on ties), or -1."""
    out = np.full((256, BINS), -1, np.int64)
    for mask in range(1, 256):
        seen = [b for b in range(BINS) if mask >> b & 1]
        for b in range(BINS):
            out[mask, b] = min(seen, key=lambda s: (abs(s - b), s))
    return out


_NEAREST = _nearest_table()


def quantise(o: type[Ops], x: Any, mean: Any, sd: Any) -> Any:
    """The bin of ``x``: `BIN_WIDTH`-deviation bins centred on ``mean``, the outer two open."""
    u = (x - mean) / (BIN_WIDTH * sd) + 0.5 * BINS
    return o.to_int(o.minimum(o.maximum(u, 0.0), BINS - 0.5))


def outermost(b: Any) -> Any:
    """Whether bin ``b`` is one of the two open-ended bins."""
    return (b == 0) | (b == BINS - 1)


def bin_centre(b: Any, mean: Any, sd: Any) -> Any:
    """The value at the centre of bin ``b`` (the open bins: one width inside their edge)."""
    return mean + (b - 0.5 * BINS + 0.5) * BIN_WIDTH * sd


def nearest_seen(mask: Any, b: Any) -> Any:
    """The seen bin nearest to ``b`` in successor byte ``mask``; -1 when none was seen."""
    return _NEAREST[mask, b]


def recent_count(flags: Any) -> Any:
    """How many of the last `CONTEXT` novelty flags (bits of ``flags``) are set."""
    total = flags & 1
    for j in range(1, CONTEXT):
        total = total + (flags >> j & 1)
    return total


def novelty_tail(o: type[Ops], k: Any, lam: Any) -> Any:
    """``-ln P(K >= k)`` for K ~ Poisson(lam), by the Chernoff bound (0 when k <= lam).

    The bound understates the surprise, never overstates it.
    """
    kk = o.maximum(k, 1.0)
    return o.where(k > lam, kk * o.log(kk / lam) - kk + lam, 0.0)
