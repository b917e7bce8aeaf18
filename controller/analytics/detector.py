"""The anomaly detector's math, on numpy arrays of many series at once.

One pass, score before learn, no lookahead, O(1) state per series: the controller runs about
100k series at 1 Hz on a small machine, so every step is a handful of whole-array numpy
operations over the series that reported, never a Python loop over series and never a window
of past samples.

Four layers, each answering one question:

1. *Point features* — how surprising is this value, in units of the series' own recent spread?
   ``level`` (distance from a slow exponentially weighted mean), ``change`` (the step from the
   previous value against the typical step) and ``trend_residual`` (distance from a fast
   mean, which follows daily shapes and slow drifts that the slow mean cannot). Each spread
   has a floor proportional to the series' magnitude, so a constant series (a GPU held at
   64 C, an idle queue at 0) has a finite scale and a step out of it is surprising, not a
   division by zero; and variance updates are winsorised so one spike does not blind it.
2. *Likelihood* (after Numenta's AnomalyLikelihood) — is the recent point surprise unusual *for
   this series*? A short exponential mean of the raw surprise is compared with its long-run
   mean and spread; the Gaussian upper tail of that comparison is the point evidence (in
   nats). Series that are always jumpy (ad-exchange prices, spiky CPU) calibrate themselves.
   A surprising event that recurs on its own period (a cron job's spike, see `schedule`) is
   capped: the Gaussian would call every occurrence a one-in-1e10 event.
3. *Pattern* (see `patterns`) — has this series shown this short shape before? A novel context
   in a series that has mostly stopped meeting novel ones is evidence (a Poisson tail); and a
   context it *has* shown, within its usual range, caps the point evidence at about one
   sample in the series' life: a recurring daily jump stops alerting once it has recurred.
4. *Flatline* — the series stuck (every recent step inside the spread floor) although its
   steps usually are not: a dead exporter repeating its last value, a drop in variability.
   Its evidence grows with the length of the run, counted in the series' longest recent
   run, at the rate this series has been stuck before, so a sparse counter that sits at 0
   most of the time, or a disk idle for hours every night, is no news.
5. *Decision* — the largest evidence is log-scaled into the score in [0, 1]; the series fires
   when ``score >= threshold``. After a detection it *reports* score 0 for ``refractory``
   samples, as an SRE's alert de-duplication would: the anomaly has been reported, and its
   aftermath is not news. The emitted score is the detector's honest output (a threshold sweep
   sees what an operator sees), and ``is_anomaly`` is exactly ``score >= threshold``.

Hyperparameters count samples, never seconds, so the same parameters serve a 1 s GPU series
and a 5 min CloudWatch series.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from llm_ops_helper.controller.analytics import patterns, schedule
from llm_ops_helper.controller.analytics.ops import (
    BoolArray,
    ByteArray,
    FloatArray,
    IntArray,
    Ops,
    ScalarOps,
)
from llm_ops_helper.controller.analytics.patterns import PatternMemory

__all__ = ["FEATURES", "FLOAT_STATE", "INT_STATE", "BoolArray", "DetectorParams", "Evaluation",
           "FloatArray", "IntArray", "ScalarOps", "State", "commit", "evaluate",
           "score_and_learn"]

FEATURES: tuple[str, ...] = ("level", "change", "trend_residual", "pattern", "flatline")
_PATTERN, _FLATLINE = 3, 4
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# Score = 1 - 2**(-log10(1/tail) / 5): a tail of 1e-5 scores 0.5, 1e-10 scores 0.75, and the
# score never saturates, so ranking (NAB's threshold sweep) survives very surprising values.
_TAIL_HALF = 5.0 * math.log(10.0) / math.log(2.0)
_FLAGS_MASK = (1 << patterns.CONTEXT) - 1


@dataclass(frozen=True, slots=True)
class DetectorParams:
    """Hyperparameters, all counted in samples (see the module docstring for their roles)."""

    slow_span: float = 256.0
    """Memory of the level mean and of every spread estimate."""
    fast_span: float = 8.0
    """Memory of the fast mean that the trend residual is measured from."""
    likelihood_span: float = 1024.0
    """Memory of the long-run distribution of raw surprise and of the novel-context rate."""
    short_span: float = 2.0
    """Memory of the short mean of raw surprise (how many samples an anomaly needs)."""
    flat_span: float = 16.0
    """Memory of the short step spread that the flatline feature compares with the slow one."""
    warmup: int = 16
    """Samples before a series scores anything but 0."""
    rel_floor: float = 0.01
    """Least spread, as a fraction of the series' typical magnitude."""
    winsor: float = 4.0
    """Residuals beyond this many spreads count as this many in the spread updates."""
    threshold: float = 0.5
    """Score at or above which the series fires."""
    refractory: int = 128
    """Samples a series reports score 0 after it fires."""

    def __post_init__(self) -> None:
        for name in ("slow_span", "fast_span", "likelihood_span", "short_span", "flat_span"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(f"DetectorParams.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 1 or self.refractory < 0:
            raise ValueError("DetectorParams.warmup must be >= 1 and refractory >= 0")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"DetectorParams.threshold must be in (0, 1], got {self.threshold}")
        if self.rel_floor < 0.0 or self.winsor <= 0.0:
            raise ValueError("DetectorParams.rel_floor must be >= 0 and winsor > 0")

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


# Per-series state: one array per field, one element per slot.
FLOAT_STATE: tuple[str, ...] = (
    "prev",  # previous value
    "mean",  # slow mean
    "var",  # slow variance about the mean
    "step_var",  # mean square of the step x - prev
    "short_step_var",  # the same over flat_span samples
    "fast",  # fast mean
    "resid_var",  # mean square of x - fast
    "magnitude",  # slow mean of |x|, for the spread floor
    "raw_short",  # short mean of raw surprise
    "raw_mean",  # long-run mean of raw surprise
    "raw_var",  # long-run variance of raw surprise
    "novel_rate",  # long-run fraction of novel contexts
    "stuck_rate",  # long-run fraction of samples stuck (flat within the spread floor)
    "onset_rate",  # stuck_rate when the current stuck run began
    "stuck_len",  # longest recent stuck run, decaying over likelihood_span
    "onset_raw",  # raw surprise at the onset of the last scheduled event
)
INT_STATE: tuple[str, ...] = (
    "count",  # values learned
    "cooldown",  # samples left of reporting 0 after a detection
    "history",  # the last CONTEXT - 1 bins, as a base-BINS number
    "novel_flags",  # bit j: the context j samples ago was novel
    "stuck_run",  # consecutive samples stuck
    "event_last",  # count at the last surprising sample
    "period_at",  # count at the onset of the last event that set the schedule
    "period",  # samples between scheduled event onsets; 0 while unknown
    "event_scheduled",  # 1 if the current (or last) event came on schedule
)


class State:
    """Struct of arrays holding every series' state, and the pattern table; grows by doubling."""

    def __init__(self, capacity: int) -> None:
        self.floats: dict[str, FloatArray] = {k: np.zeros(capacity) for k in FLOAT_STATE}
        self.ints: dict[str, IntArray] = {k: np.zeros(capacity, np.int64) for k in INT_STATE}
        self.table: ByteArray = np.zeros((capacity, patterns.TABLE_BYTES), np.uint8)

    @property
    def capacity(self) -> int:
        return len(self.ints["count"])

    def grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        for table in (self.floats, self.ints):
            for k, old in table.items():
                new = np.zeros(capacity, old.dtype)
                new[: len(old)] = old
                table[k] = new  # type: ignore[assignment]
        grown = np.zeros((capacity, patterns.TABLE_BYTES), np.uint8)
        grown[: len(self.table)] = self.table
        self.table = grown


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What scoring found, and the state that learning the value will write.

    Fields are arrays aligned with the batch (the bank) or scalars (`OnlineDetector`).
    ``context`` is the context to add to the pattern table (history * BINS + bin), if
    ``remember``.
    """

    score: Any
    is_anomaly: Any
    feature: Any
    expected: Any
    new_floats: dict[str, Any]
    new_ints: dict[str, Any]
    context: Any
    remember: Any


def _rate(span: float) -> float:
    """The exponential weight whose mean age is ``span`` samples (as pandas' ``span``)."""
    return 2.0 / (span + 1.0)


def _gaussian_tail(o: type[Ops], z: Any) -> Any:
    """``-ln Q(z)`` for z >= 0 (Boerjesson-Sundberg's approximation of Q, within 1 %)."""
    return 0.5 * z * z + _LOG_SQRT_2PI + o.log(0.661 * z + 0.339 * o.sqrt(z * z + 5.51))


def score_and_learn(o: type[Ops], f: dict[str, Any], i: dict[str, Any], x: Any,
                    p: DetectorParams, memory: PatternMemory) -> Evaluation:
    """The detector: score ``x`` against state ``f``/``i``/``memory``, and the state after
    learning it.

    A pure function of its inputs, written once for arrays and floats (``o`` supplies the
    elementwise functions). ``x`` must be finite; a missing value is never passed in.
    """
    count = i["count"]
    first = count == 0
    prev = o.where(first, x, f["prev"])
    mean = o.where(first, x, f["mean"])
    fast = o.where(first, x, f["fast"])
    magnitude = o.where(first, o.abs(x), f["magnitude"])

    # 1. Point features: residuals in units of spreads floored at rel_floor of the magnitude.
    floor = p.rel_floor * magnitude
    floor2 = floor * floor + 1e-300
    r_level, r_change, r_trend = x - mean, x - prev, x - fast
    s2_level = o.maximum(f["var"], floor2)
    s2_change = o.maximum(f["step_var"], floor2)
    s2_trend = o.maximum(f["resid_var"], floor2)
    z_level = o.abs(r_level) / o.sqrt(s2_level)
    z_change = o.abs(r_change) / o.sqrt(s2_change)
    z_trend = o.abs(r_trend) / o.sqrt(s2_trend)
    # Winsorised squares: one spike widens a spread by at most winsor**2 weights.
    w2 = p.winsor * p.winsor
    sq_level = o.minimum(r_level * r_level, w2 * s2_level)
    sq_change = o.minimum(r_change * r_change, w2 * s2_change)
    sq_trend = o.minimum(r_trend * r_trend, w2 * s2_trend)
    # Flatline: every step of the last ~flat_span within the spread floor, in a series whose
    # steps usually are not. How rare being stuck is comes from the series' own history (a
    # sparse counter sits at 0 most of the time: no news); each further stretch as long as
    # its longest recent run (at least flat_span samples) is one more independent trial at
    # that rate: a disk idle for hours every night is not flat news after an hour.
    a_flat = o.maximum(_rate(p.flat_span), 1.0 / o.maximum(count, 1.0))
    short_step_var = o.where(first, 0.0, f["short_step_var"] + a_flat * (sq_change
                                                                         - f["short_step_var"]))
    stuck = (short_step_var <= floor2) & (f["step_var"] > floor2)
    stuck_run = o.where(stuck, i["stuck_run"] + 1, 0)
    # The rate as it was when this run began: a long run must not teach itself to be usual.
    onset_rate = o.where(stuck_run == 1, f["stuck_rate"], f["onset_rate"])
    trial = o.maximum(f["stuck_len"], p.flat_span)
    flat_tail = stuck_run / trial * -o.log(o.maximum(onset_rate, 1.0 / p.likelihood_span))

    feature = o.where(z_change > z_level, 1, 0)
    zmax = o.maximum(z_level, z_change)
    feature = o.where(z_trend > zmax, 2, feature)
    zmax = o.maximum(zmax, z_trend)
    zmax = o.minimum(zmax, 1e6)
    raw = o.log1p(0.5 * zmax * zmax)

    # 2. Likelihood: the short mean of raw surprise against its long-run distribution.
    raw_short = o.where(first, raw, f["raw_short"] + _rate(p.short_span) * (raw - f["raw_short"]))
    raw_mean, raw_var = f["raw_mean"], f["raw_var"]
    zl = o.maximum((raw_short - raw_mean) / o.sqrt(o.maximum(raw_var, 1e-4)), 0.0)
    point_tail = _gaussian_tail(o, zl)
    # A surprising event on its own schedule (see `schedule`) is capped as a recurring context
    # is below: about as rare as one sample in the series' life.
    event = (count >= p.warmup) & (point_tail >= -_TAIL_HALF * math.log1p(-p.threshold))
    sched = schedule.track(o, event, raw_short, count, f, i)
    point_tail = o.where(sched.scheduled, o.minimum(point_tail, o.log(count + 1.0)), point_tail)

    # 3. Pattern: is the context (last CONTEXT - 1 bins, and this one) new to this series?
    # The rate of novel contexts is floored at one per likelihood_span: the detector cannot
    # claim a rarity that its memory is too short to have measured.
    sd = o.sqrt(s2_level)
    b = patterns.quantise(o, x, mean, sd)
    history = o.where(first, b * (1 + patterns.BINS + patterns.BINS * patterns.BINS),
                      i["history"])
    seen_after = memory.successors(history)
    novel = o.where((seen_after >> b & 1) == 0, 1, 0)
    flags = (i["novel_flags"] * 2 + novel) & _FLAGS_MASK
    novel_rate = o.where(first, 1.0, f["novel_rate"])
    lam = patterns.CONTEXT * o.maximum(novel_rate, 1.0 / p.likelihood_span)
    pattern_tail = patterns.novelty_tail(o, patterns.recent_count(flags), lam)
    # A context seen before (within one bin: values near a bin edge fall either side) whose
    # value is inside the open outer bins has happened before, so it is at most about as rare
    # as one sample in the series' life: this is what silences a recurring daily jump. A value
    # in an outer bin (beyond 3 deviations) keeps its full point evidence.
    nearest = patterns.nearest_seen(seen_after, b)
    known = (nearest >= 0) & (o.abs(nearest - b) <= 1)
    recurring = known & o.where(patterns.outermost(b), False, True)
    point_tail = o.where(recurring, o.minimum(point_tail, o.log(count + 1.0)), point_tail)
    feature = o.where(pattern_tail > point_tail, _PATTERN, feature)
    tail = o.maximum(point_tail, pattern_tail)
    feature = o.where(flat_tail > tail, _FLATLINE, feature)
    tail = o.maximum(tail, flat_tail)

    # 4. Decision, with the report suppressed during the refractory period.
    cooldown = i["cooldown"]
    score = o.where((count < p.warmup) | (cooldown > 0), 0.0, -o.expm1(-tail / _TAIL_HALF))
    fire = score >= p.threshold
    expected = o.where(feature == 0, mean, o.where(feature == 1, prev, fast))
    expected = o.where(feature == _FLATLINE, mean, expected)
    expected = o.where(feature == _PATTERN,
                       o.where(nearest >= 0, patterns.bin_centre(nearest, mean, sd), mean),
                       expected)

    # Learning. Means start as running averages and settle into exponential ones, so early
    # estimates are not biased towards the first value.
    startup = 1.0 / (count + 1.0)
    a_slow = o.maximum(_rate(p.slow_span), startup)
    a_fast = o.maximum(_rate(p.fast_span), startup)
    a_raw = o.maximum(_rate(p.likelihood_span), startup)
    # There is no step before the second sample; it starts the step average.
    a_step = o.maximum(_rate(p.slow_span), 1.0 / o.maximum(count, 1.0))
    d_raw = raw - raw_mean
    new_floats = {
        "prev": x,
        "mean": mean + a_slow * (x - mean),
        "var": (1.0 - a_slow) * (f["var"] + a_slow * sq_level),
        "step_var": o.where(first, 0.0, f["step_var"] + a_step * (sq_change - f["step_var"])),
        "short_step_var": short_step_var,
        "fast": fast + a_fast * (x - fast),
        "resid_var": f["resid_var"] + a_slow * (sq_trend - f["resid_var"]),
        "magnitude": magnitude + a_slow * (o.abs(x) - magnitude),
        "raw_short": raw_short,
        "raw_mean": raw_mean + a_raw * d_raw,
        "raw_var": (1.0 - a_raw) * (raw_var + a_raw * d_raw * d_raw),
        "stuck_rate": f["stuck_rate"] + a_raw * (o.where(stuck, 1.0, 0.0) - f["stuck_rate"]),
        "onset_rate": onset_rate,
        "stuck_len": o.maximum(f["stuck_len"] * (1.0 - _rate(p.likelihood_span)),
                               o.where(stuck, 0, i["stuck_run"])),
        "novel_rate": novel_rate + a_raw * (novel - novel_rate),
        "onset_raw": sched.onset_raw,
    }
    context = history * patterns.BINS + b
    new_ints = {
        "count": count + 1,
        "cooldown": o.where(fire, p.refractory, o.maximum(cooldown - 1, 0)),
        "history": context % patterns.TABLE_BYTES,
        "novel_flags": flags,
        "stuck_run": stuck_run,
        "event_last": sched.event_last,
        "period_at": sched.period_at,
        "period": sched.period,
        "event_scheduled": sched.event_scheduled,
    }
    return Evaluation(score=score, is_anomaly=fire, feature=feature, expected=expected,
                      new_floats=new_floats, new_ints=new_ints, context=context,
                      # Contexts are only remembered once the bins' scale has settled (a
                      # slow_span of samples): start-up contexts would be noise, kept forever.
                      remember=count >= p.slow_span)


def evaluate(state: State, slots: IntArray, x: FloatArray, p: DetectorParams) -> Evaluation:
    """Score every ``x[i]`` against slot ``slots[i]``; the state is not changed.

    ``slots`` must be distinct and ``x`` finite (the bank splits repeats into rounds and drops
    missing values before calling).
    """
    f = {k: v[slots] for k, v in state.floats.items()}
    i = {k: v[slots] for k, v in state.ints.items()}
    return score_and_learn(Ops, f, i, x, p, patterns.BatchMemory(state.table, slots))


def commit(state: State, slots: IntArray, e: Evaluation) -> None:
    """Write the state that learning the evaluated values produces."""
    for k, v in e.new_floats.items():
        state.floats[k][slots] = v
    for k, v in e.new_ints.items():
        state.ints[k][slots] = v
    bits = (np.left_shift(1, e.context % patterns.BINS) * e.remember).astype(np.uint8)
    state.table[slots, e.context // patterns.BINS] |= bits
