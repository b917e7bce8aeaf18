"""Scheduled events: a surprise that recurs on its own period is a job, not an anomaly.

Servers run cron jobs, nightly backups and hourly batch exports: each is a spike in CPU, disk
writes or network far outside the series' usual spread (45 deviations is common), so the
point features and the Gaussian likelihood call every occurrence a one-in-1e10 event. The
pattern memory does not help: the spike lands in the open outer bins, where shapes are not
told apart. What marks such a spike is *when* it comes: one period after the last one.

So each series tracks its surprising *events* (runs of samples whose point evidence alone
would fire, a sample or two apart: a spike and its return) and the interval between event
onsets. An onset that comes one interval after the last scheduled onset (within
`TOLERANCE` of it), no bigger than that one was (by more than `MAGNITUDE` nats of raw
surprise), is on schedule: its point evidence is capped, and so is the rest of its event.
An onset well before the next one is due is an interloper: it keeps its full evidence and
leaves the schedule alone, so an unscheduled spike still fires and the job's rhythm is not
lost. An onset late or with no schedule yet starts a new interval. The second and third
occurrences of a job still fire (the first interval is being measured); after that, only a
bigger or an unscheduled spike does. A handful of integers per series, no window.

Intervals count samples, never seconds, like every other parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_ops_helper.controller.analytics.ops import Ops

GAP = 2
"""Samples of calm that may separate two samples of one event (a spike, its return)."""
TOLERANCE = 0.125
"""Fraction of the interval by which a scheduled onset may be early or late (jobs jitter)."""
MAGNITUDE = 1.0
"""Nats of raw surprise (deviations times about 1.65) above the last scheduled onset that make
an on-time event news: a job that suddenly does far more than it used to."""


@dataclass(frozen=True, slots=True)
class Step:
    """What the schedule says of one sample, and the schedule after it."""

    scheduled: Any
    """The sample belongs to an event that came on schedule."""
    event_last: Any
    period_at: Any
    period: Any
    event_scheduled: Any
    onset_raw: Any


def track(o: type[Ops], event: Any, raw: Any, count: Any, f: dict[str, Any],
          i: dict[str, Any]) -> Step:
    """Place sample ``count`` (surprising if ``event``, raw surprise ``raw``) on the schedule.

    ``f`` and ``i`` hold the series' state: ``onset_raw``; ``event_last``, ``period_at``,
    ``period`` and ``event_scheduled`` (see `detector.FLOAT_STATE` and `detector.INT_STATE`).
    """
    onset = event & (count - i["event_last"] > GAP)
    period, since = i["period"], count - i["period_at"]
    in_step = o.abs(since - period) <= TOLERANCE * period
    on_time = onset & (period > 0) & in_step & (raw <= f["onset_raw"] + MAGNITUDE)
    early = (period > 0) & (since < period - TOLERANCE * period)
    reschedule = onset & (in_step | ~early)
    return Step(
        scheduled=o.where(onset, on_time, event & (i["event_scheduled"] > 0)),
        event_last=o.where(event, count, i["event_last"]),
        period_at=o.where(reschedule, count, i["period_at"]),
        period=o.where(reschedule, o.where(i["period_at"] > 0, since, 0), period),
        event_scheduled=o.where(onset, o.where(on_time, 1, 0), i["event_scheduled"]),
        onset_raw=o.where(reschedule, raw, f["onset_raw"]),
    )
