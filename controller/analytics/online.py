"""`OnlineDetector`: the bank's detector for one series, in River's shape.

For notebooks, River pipelines and `river.evaluate`-style comparisons: ``score_one`` before
``learn_one`` on ``{"value": v}``. It runs the very same `detector.evaluate` and
`detector.commit`'s math as `DetectorBank` (`detector.score_and_learn`, on floats instead of
arrays), so both give identical scores.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from river import base

from llm_ops_helper.controller.analytics import patterns
from llm_ops_helper.controller.analytics.detector import (
    FLOAT_STATE,
    INT_STATE,
    DetectorParams,
    Evaluation,
    score_and_learn,
)
from llm_ops_helper.controller.analytics.ops import ScalarOps

_DEFAULTS = DetectorParams()


class OnlineDetector(base.AnomalyDetector):
    """Online anomaly detector for one numeric series (see `detector` for the method).

    Parameters are those of `DetectorParams`, counted in samples. ``x`` is a dict whose
    ``feature`` entry (or, if absent, its single numeric value) is the series value; a missing
    or non-finite value scores 0 and is not learned.
    """

    def __init__(
        self,
        slow_span: float = _DEFAULTS.slow_span,
        fast_span: float = _DEFAULTS.fast_span,
        likelihood_span: float = _DEFAULTS.likelihood_span,
        short_span: float = _DEFAULTS.short_span,
        flat_span: float = _DEFAULTS.flat_span,
        warmup: int = _DEFAULTS.warmup,
        rel_floor: float = _DEFAULTS.rel_floor,
        winsor: float = _DEFAULTS.winsor,
        threshold: float = _DEFAULTS.threshold,
        refractory: int = _DEFAULTS.refractory,
        feature: str = "value",
    ) -> None:
        self.slow_span = slow_span
        self.fast_span = fast_span
        self.likelihood_span = likelihood_span
        self.short_span = short_span
        self.flat_span = flat_span
        self.warmup = warmup
        self.rel_floor = rel_floor
        self.winsor = winsor
        self.threshold = threshold
        self.refractory = refractory
        self.feature = feature
        self._params = DetectorParams(
            slow_span=slow_span, fast_span=fast_span, likelihood_span=likelihood_span,
            short_span=short_span, flat_span=flat_span, warmup=warmup, rel_floor=rel_floor,
            winsor=winsor, threshold=threshold, refractory=refractory)
        self._floats: dict[str, Any] = dict.fromkeys(FLOAT_STATE, 0.0)
        self._ints: dict[str, Any] = dict.fromkeys(INT_STATE, 0)
        self._table = np.zeros(patterns.TABLE_BYTES, np.uint8)
        # score_one's evaluation of the last value, reused by a following learn_one.
        self._pending: tuple[float, Evaluation] | None = None
        self.last_is_anomaly = False
        """The alert decision of the last learned value (its score >= threshold)."""

    @classmethod
    def _unit_test_params(cls) -> Any:
        yield {}
        yield {"slow_span": 64.0, "refractory": 16}

    def _value(self, x: dict[Any, Any]) -> float:
        v = x.get(self.feature)
        if v is None and len(x) == 1:
            v = next(iter(x.values()))
        try:
            return float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            return math.nan

    def _evaluate(self, v: float) -> Evaluation:
        if self._pending is not None and self._pending[0] == v:
            return self._pending[1]
        e = score_and_learn(ScalarOps, self._floats, self._ints, v, self._params,
                            patterns.RowMemory(self._table))
        self._pending = (v, e)
        return e

    def score_one(self, x: dict[Any, Any]) -> float:
        v = self._value(x)
        if not math.isfinite(v):
            return 0.0
        return float(self._evaluate(v).score)

    def learn_one(self, x: dict[Any, Any]) -> None:
        v = self._value(x)
        if not math.isfinite(v):
            return
        e = self._evaluate(v)
        self._floats, self._ints = e.new_floats, e.new_ints
        if e.remember:
            self._table[e.context // patterns.BINS] |= np.uint8(1 << e.context % patterns.BINS)
        self._pending = None
        self.last_is_anomaly = bool(e.is_anomaly)
