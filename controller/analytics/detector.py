"""The anomaly detector's math, on numpy arrays of many series at once.

One pass, score before learn, no lookahead, O(1) state per series: the controller runs about
100k series at 1 Hz on a small machine, so every step is a handful of whole-array numpy
operations over the series that reported, never a Python loop over series and never a window
of past samples.

Three layers, each answering one question:

1. *Features* — how surprising is this value, in units of the series' own recent spread?
   ``level`` (distance from a slow exponentially weighted mean), ``change`` (the step from the
   previous value against the typical step) and ``trend_residual`` (distance from a fast mean,
   which follows daily shapes and slow drifts that the slow mean cannot). Each spread has a
   floor proportional to the series' magnitude, so a constant series (a GPU held at 64 C, an
   idle queue at 0) has a finite scale and a step out of it is surprising, not a division by
   zero; and variance updates are winsorised so one spike does not blind the detector.
2. *Likelihood* (after Numenta's AnomalyLikelihood) — is the recent surprise unusual *for this
   series*? A short exponential mean of the raw surprise is compared with its long-run mean and
   spread; the Gaussian upper tail of that comparison, log-scaled, is the score in [0, 1].
   Series that are always jumpy (ad-exchange prices, spiky CPU) calibrate themselves.
3. *Decision* — ``score >= threshold`` while armed; after firing the series is disarmed for
   ``refractory`` samples, as an SRE's alert de-duplication would do. The score itself is
   unaffected by the decision.

Hyperparameters count samples, never seconds, so the same parameters serve a 1 s GPU series
and a 5 min CloudWatch series.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

FEATURES: tuple[str, ...] = ("level", "change", "trend_residual")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# Score = 1 - 2**(-log10(1/tail) / 5): a tail of 1e-5 scores 0.5, 1e-10 scores 0.75, and the
# score never saturates, so ranking (NAB's threshold sweep) survives very surprising values.
_TAIL_HALF = 5.0 * math.log(10.0) / math.log(2.0)


@dataclass(frozen=True, slots=True)
class DetectorParams:
    """Hyperparameters, all counted in samples (see the module docstring for their roles)."""

    slow_span: float = 256.0
    """Memory of the level mean and of every spread estimate."""
    fast_span: float = 8.0
    """Memory of the fast mean that the trend residual is measured from."""
    likelihood_span: float = 1024.0
    """Memory of the long-run distribution of raw surprise."""
    short_span: float = 2.0
    """Memory of the short mean of raw surprise (how many samples an anomaly needs)."""
    warmup: int = 16
    """Samples before a series scores anything but 0."""
    rel_floor: float = 0.01
    """Least spread, as a fraction of the series' typical magnitude."""
    winsor: float = 4.0
    """Residuals beyond this many spreads count as this many in the spread updates."""
    threshold: float = 0.5
    """Score at or above which an armed series fires."""
    refractory: int = 128
    """Samples a series stays disarmed after it fires."""

    def __post_init__(self) -> None:
        for name in ("slow_span", "fast_span", "likelihood_span", "short_span"):
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
    "fast",  # fast mean
    "resid_var",  # mean square of x - fast
    "magnitude",  # slow mean of |x|, for the spread floor
    "raw_short",  # short mean of raw surprise
    "raw_mean",  # long-run mean of raw surprise
    "raw_var",  # long-run variance of raw surprise
)
INT_STATE: tuple[str, ...] = ("count", "cooldown")


class State:
    """Struct of arrays holding every series' state; grows by doubling."""

    def __init__(self, capacity: int) -> None:
        self.floats: dict[str, FloatArray] = {k: np.zeros(capacity) for k in FLOAT_STATE}
        self.ints: dict[str, IntArray] = {k: np.zeros(capacity, np.int64) for k in INT_STATE}

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


class Ops:
    """The few elementwise functions the math needs, for numpy arrays (the bank)."""

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return np.where(cond, a, b)

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return np.maximum(a, b)

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        return np.minimum(a, b)

    @staticmethod
    def sqrt(a: Any) -> Any:
        return np.sqrt(a)

    @staticmethod
    def log(a: Any) -> Any:
        return np.log(a)

    @staticmethod
    def log1p(a: Any) -> Any:
        return np.log1p(a)

    @staticmethod
    def expm1(a: Any) -> Any:
        return np.expm1(a)

    @staticmethod
    def abs(a: Any) -> Any:
        return np.abs(a)


class ScalarOps(Ops):
    """The same functions for one float (`OnlineDetector`): branches instead of masks.

    Transcendentals stay numpy's, so a single series scores bit for bit as in the bank.
    """

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return a if a >= b else b

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        return a if a <= b else b

    @staticmethod
    def sqrt(a: Any) -> Any:
        return math.sqrt(a)

    @staticmethod
    def abs(a: Any) -> Any:
        return abs(a)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What scoring found, and the state that learning the value will write.

    Fields are arrays aligned with the batch (the bank) or floats (`OnlineDetector`).
    """

    score: Any
    is_anomaly: Any
    feature: Any
    expected: Any
    new_floats: dict[str, Any]
    new_ints: dict[str, Any]


def _rate(span: float) -> float:
    """The exponential weight whose mean age is ``span`` samples (as pandas' ``span``)."""
    return 2.0 / (span + 1.0)


def score_and_learn(o: type[Ops], f: dict[str, Any], i: dict[str, Any], x: Any,
                    p: DetectorParams) -> Evaluation:
    """The detector: score ``x`` against state ``f``/``i``, and the state after learning it.

    A pure function of its inputs, written once for arrays and floats (``o`` supplies the
    elementwise functions). ``x`` must be finite; a missing value is never passed in.
    """
    count = i["count"]
    first = count == 0
    prev = o.where(first, x, f["prev"])
    mean = o.where(first, x, f["mean"])
    fast = o.where(first, x, f["fast"])
    magnitude = o.where(first, o.abs(x), f["magnitude"])

    # 1. Features: residuals in units of spreads floored at rel_floor of the magnitude.
    floor = p.rel_floor * magnitude
    floor2 = floor * floor + 1e-300
    r_level, r_change, r_trend = x - mean, x - prev, x - fast
    s2_level = o.maximum(f["var"], floor2)
    s2_change = o.maximum(f["step_var"], floor2)
    s2_trend = o.maximum(f["resid_var"], floor2)
    z_level = o.abs(r_level) / o.sqrt(s2_level)
    z_change = o.abs(r_change) / o.sqrt(s2_change)
    z_trend = o.abs(r_trend) / o.sqrt(s2_trend)
    feature = o.where(z_change > z_level, 1, 0)
    zmax = o.maximum(z_level, z_change)
    feature = o.where(z_trend > zmax, 2, feature)
    zmax = o.minimum(o.maximum(zmax, z_trend), 1e6)
    raw = o.log1p(0.5 * zmax * zmax)

    # 2. Likelihood: the short mean of raw surprise against its long-run distribution,
    # as a Gaussian upper tail (Boerjesson-Sundberg's approximation of -ln Q, within 1 %).
    raw_short = o.where(first, raw, f["raw_short"] + _rate(p.short_span) * (raw - f["raw_short"]))
    raw_mean, raw_var = f["raw_mean"], f["raw_var"]
    zl = o.maximum((raw_short - raw_mean) / o.sqrt(o.maximum(raw_var, 1e-4)), 0.0)
    tail = 0.5 * zl * zl + _LOG_SQRT_2PI + o.log(0.661 * zl + 0.339 * o.sqrt(zl * zl + 5.51))
    score = o.where(count < p.warmup, 0.0, -o.expm1(-tail / _TAIL_HALF))

    # 3. Decision.
    cooldown = i["cooldown"]
    fire = (score >= p.threshold) & (cooldown == 0)
    expected = o.where(feature == 0, mean, o.where(feature == 1, prev, fast))

    # Learning. Means start as running averages and settle into exponential ones, so early
    # estimates are not biased towards the first value.
    startup = 1.0 / (count + 1.0)
    a_slow = o.maximum(_rate(p.slow_span), startup)
    a_fast = o.maximum(_rate(p.fast_span), startup)
    a_raw = o.maximum(_rate(p.likelihood_span), startup)
    # There is no step before the second sample; it starts the step average.
    a_step = o.maximum(_rate(p.slow_span), 1.0 / o.maximum(count, 1.0))
    # Spreads take winsorised squares: one spike widens them by at most winsor**2 weights.
    w2 = p.winsor * p.winsor
    sq_level = o.minimum(r_level * r_level, w2 * s2_level)
    sq_change = o.minimum(r_change * r_change, w2 * s2_change)
    sq_trend = o.minimum(r_trend * r_trend, w2 * s2_trend)
    d_raw = raw - raw_mean
    new_floats = {
        "prev": x,
        "mean": mean + a_slow * (x - mean),
        "var": (1.0 - a_slow) * (f["var"] + a_slow * sq_level),
        "step_var": o.where(first, 0.0, f["step_var"] + a_step * (sq_change - f["step_var"])),
        "fast": fast + a_fast * (x - fast),
        "resid_var": f["resid_var"] + a_slow * (sq_trend - f["resid_var"]),
        "magnitude": magnitude + a_slow * (o.abs(x) - magnitude),
        "raw_short": raw_short,
        "raw_mean": raw_mean + a_raw * d_raw,
        "raw_var": (1.0 - a_raw) * (raw_var + a_raw * d_raw * d_raw),
    }
    new_ints = {
        "count": count + 1,
        "cooldown": o.where(fire, p.refractory, o.maximum(cooldown - 1, 0)),
    }
    return Evaluation(score=score, is_anomaly=fire, feature=feature, expected=expected,
                      new_floats=new_floats, new_ints=new_ints)


def evaluate(state: State, slots: IntArray, x: FloatArray, p: DetectorParams) -> Evaluation:
    """Score every ``x[i]`` against slot ``slots[i]``; the state is not changed.

    ``slots`` must be distinct and ``x`` finite (the bank splits repeats into rounds and drops
    missing values before calling).
    """
    f = {k: v[slots] for k, v in state.floats.items()}
    i = {k: v[slots] for k, v in state.ints.items()}
    return score_and_learn(Ops, f, i, x, p)


def commit(state: State, slots: IntArray, e: Evaluation) -> None:
    """Write the state that learning the evaluated values produces."""
    for k, v in e.new_floats.items():
        state.floats[k][slots] = v
    for k, v in e.new_ints.items():
        state.ints[k][slots] = v
