"""Forecasters: River's shape (clone, pickle, forecast lists), their values, conformal coverage."""

from __future__ import annotations

import math
import pickle
import random
from typing import Any

import pytest
from river import base as river_base
from river.time_series import base

from llm_ops_helper.controller.autoscale.forecast import (
    EWMA,
    ConformalForecaster,
    LagRegression,
    MovingAverage,
    Naive,
)

ESTIMATORS = [Naive, MovingAverage, EWMA, LagRegression, ConformalForecaster]


def instances() -> list[base.Forecaster]:
    out: list[base.Forecaster] = [Naive()]
    for cls in ESTIMATORS[1:]:
        out += [cls(**params) for params in cls._unit_test_params()]  # type: ignore[attr-defined]
    return out


def bursty(n: int, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(3.0, 1.0) if rng.random() < 0.4 else 0.0 for _ in range(n)]


@pytest.mark.parametrize("model", instances(), ids=repr)
def test_river_shape(model: base.Forecaster) -> None:
    assert isinstance(model, river_base.Estimator)
    fresh = model.clone()
    assert fresh._get_params() == model._get_params()
    series = bursty(300)
    for y in series[:200]:
        model.learn_one(y)
    out = model.forecast(4)
    assert len(out) == 4 and all(math.isfinite(v) and v >= 0 for v in out)
    # A pickled checkpoint carries on exactly as the original.
    restored = pickle.loads(pickle.dumps(model))
    for y in series[200:]:
        model.learn_one(y)
        restored.learn_one(y)
    assert restored.forecast(4) == model.forecast(4)
    # clone() forgets what was learned.
    assert model.clone().forecast(2) == fresh.forecast(2)


def test_point_forecasters_values() -> None:
    ma, ew, nv = MovingAverage(3), EWMA(0.5), Naive()
    for y in (1.0, 2.0, 3.0, 10.0):
        for m in (ma, ew, nv):
            m.learn_one(y)
    assert ma.forecast(2) == [5.0, 5.0]
    assert ew.forecast(1) == [6.125]  # 1 -> 1.5 -> 2.25 -> 2.25 + (10 - 2.25) / 2
    assert nv.forecast(3) == [10.0] * 3
    assert MovingAverage(4).forecast(1) == [0.0]


def test_lag_regression_learns_an_ar1_series() -> None:
    rng = random.Random(1)
    y, model, series = 50.0, LagRegression(1), []
    for _ in range(4000):
        y = 20 + 0.6 * y + rng.gauss(0, 2)
        series.append(y)
        model.learn_one(y)
    # Steady state mean 50: the iterated forecast converges to it from the last value.
    one, far = model.forecast(30)[0], model.forecast(30)[-1]
    assert one == pytest.approx(20 + 0.6 * series[-1], abs=4)
    assert far == pytest.approx(50, abs=5)


@pytest.mark.parametrize("bad", [{"window": 0}, {"alpha": 0.0}, {"lags": 0}, {"horizon": 0},
                                 {"quantile": 1.0}])
def test_bad_parameters(bad: dict[str, Any]) -> None:
    cls = {"window": MovingAverage, "alpha": EWMA, "lags": LagRegression}.get(
        next(iter(bad)), ConformalForecaster)
    with pytest.raises(ValueError, match="must be"):
        cls(**bad)


@pytest.mark.parametrize("q", [0.8, 0.9])
def test_conformal_upper_bound_keeps_its_coverage(q: float) -> None:
    horizon, series = 5, bursty(6000, seed=3)
    f = ConformalForecaster(EWMA(0.1), horizon=horizon, quantile=q, window=400, warmup=400)
    uppers: list[float | None] = []
    for y in series:
        f.learn_one(y)
        p = f.predict()
        uppers.append(p.upper if f._scored >= f.warmup else None)
    hits = [series[k + horizon] <= u for k, u in enumerate(uppers[:-horizon]) if u is not None]
    assert len(hits) > 5000
    assert sum(hits) / len(hits) == pytest.approx(q, abs=0.03)


def test_predict_before_warmup_is_not_ok_and_bounds_by_the_last_value() -> None:
    f = ConformalForecaster(MovingAverage(4), horizon=2, warmup=3)
    p = f.predict()
    assert (p.point, p.upper, p.ok) == (0.0, 0.0, False)
    for y in (4.0, 8.0):
        f.learn_one(y)
    p = f.predict()
    assert (p.point, p.upper, p.ok, p.mae) == (6.0, 8.0, False, None)


def test_falls_back_when_its_error_is_much_worse_than_naive() -> None:
    # A slow average on a trending series lags far behind; the last value does not.
    trend = [float(10 * k) for k in range(400)]
    slow = ConformalForecaster(MovingAverage(100), horizon=3, window=50, warmup=10)
    fast = ConformalForecaster(EWMA(1.0), horizon=3, window=50, warmup=10)
    for y in trend:
        slow.learn_one(y)
        fast.learn_one(y)
    bad, good = slow.predict(), fast.predict()
    assert not bad.ok and bad.mae is not None and bad.naive_mae is not None
    assert bad.mae > 1.5 * bad.naive_mae
    assert good.ok and good.mae == pytest.approx(good.naive_mae)
