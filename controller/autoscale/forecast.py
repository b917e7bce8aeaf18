"""Load forecasters in River's shape, and a conformal upper bound with a fall-back flag.

Point forecasters (`learn_one(y)`, `forecast(horizon) -> list[float]`, on River's
`time_series.base.Forecaster`, so `clone()` and pickling work):

- `MovingAverage`: the mean of the last ``window`` values, for every step ahead.
- `EWMA`: exponentially weighted mean, for every step ahead.
- `Naive`: the last value (what a reactive policy assumes).
- `LagRegression`: River's online linear regression on the last ``lags`` values (SNARIMAX(p,0,0)
  fitted by SGD), iterated for steps ahead.

`ConformalForecaster` wraps one of them at a fixed horizon (one cold start ahead, in steps) and
adds the upper bound the policy sizes for: the point forecast plus a rolling ``quantile`` of its
own signed errors at that horizon (split-conformal on a sliding window). It also watches its
error against the naive forecast's at the same horizon; when its recent mean absolute error is
``fallback_ratio`` times the naive one or worse (or before ``warmup`` errors are known),
`Forecast.ok` is false and the policy falls back to reactive sizing.

Which point forecaster to use is chosen by measurement: `bench/autoscale.py` compares them on
the first half of the Azure LLM trace only and reports on the second.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from river import linear_model, optim, preprocessing, stats, utils
from river.time_series import base


class Naive(base.Forecaster):
    """The last value seen, for every step ahead."""

    def __init__(self) -> None:
        self._last = 0.0

    def learn_one(self, y: float, x: dict[str, Any] | None = None) -> None:
        self._last = float(y)

    def forecast(self, horizon: int, xs: list[dict[str, Any]] | None = None) -> list[float]:
        return [self._last] * horizon


class MovingAverage(base.Forecaster):
    """Mean of the last ``window`` values, for every step ahead."""

    def __init__(self, window: int = 12) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._values: deque[float] = deque(maxlen=window)
        self._sum = 0.0

    @classmethod
    def _unit_test_params(cls) -> Any:
        yield {"window": 12}
        yield {"window": 3}

    def learn_one(self, y: float, x: dict[str, Any] | None = None) -> None:
        if len(self._values) == self.window:
            self._sum -= self._values[0]
        self._values.append(float(y))
        self._sum += float(y)

    def forecast(self, horizon: int, xs: list[dict[str, Any]] | None = None) -> list[float]:
        mean = self._sum / len(self._values) if self._values else 0.0
        return [max(mean, 0.0)] * horizon


class EWMA(base.Forecaster):
    """Exponentially weighted mean with weight ``alpha`` on the newest value."""

    def __init__(self, alpha: float = 0.15) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._mean: float | None = None

    @classmethod
    def _unit_test_params(cls) -> Any:
        yield {"alpha": 0.15}
        yield {"alpha": 0.5}

    def learn_one(self, y: float, x: dict[str, Any] | None = None) -> None:
        y = float(y)
        self._mean = y if self._mean is None else self._mean + self.alpha * (y - self._mean)

    def forecast(self, horizon: int, xs: list[dict[str, Any]] | None = None) -> list[float]:
        return [self._mean or 0.0] * horizon


class LagRegression(base.Forecaster):
    """Online linear regression of the next value on the last ``lags`` values, iterated ahead.

    An AR(``lags``) model (SNARIMAX(p, 0, 0)) fitted by SGD on standardised lags; forecasts
    below zero are clipped (load is never negative).
    """

    def __init__(self, lags: int = 1, learning_rate: float = 0.01) -> None:
        if lags < 1:
            raise ValueError(f"lags must be >= 1, got {lags}")
        self.lags = lags
        self.learning_rate = learning_rate
        self._model = preprocessing.StandardScaler() | linear_model.LinearRegression(
            optimizer=optim.SGD(learning_rate), intercept_lr=learning_rate)
        self._history: deque[float] = deque(maxlen=lags)
        self._scale = stats.Mean()

    @classmethod
    def _unit_test_params(cls) -> Any:
        yield {"lags": 1}
        yield {"lags": 3, "learning_rate": 0.005}

    def _features(self, history: list[float]) -> dict[str, float]:
        scale = self._scale.get() or 1.0
        return {f"lag{i + 1}": v / scale for i, v in enumerate(reversed(history))}

    def learn_one(self, y: float, x: dict[str, Any] | None = None) -> None:
        y = float(y)
        self._scale.update(abs(y))
        if len(self._history) == self.lags:
            self._model.learn_one(self._features(list(self._history)),
                                  y / (self._scale.get() or 1.0))
        self._history.append(y)

    def forecast(self, horizon: int, xs: list[dict[str, Any]] | None = None) -> list[float]:
        if len(self._history) < self.lags:
            last = self._history[-1] if self._history else 0.0
            return [last] * horizon
        scale = self._scale.get() or 1.0
        history, out = list(self._history), []
        for _ in range(horizon):
            y = max(float(self._model.predict_one(self._features(history))) * scale, 0.0)
            out.append(y)
            history = [*history[1:], y]
        return out


@dataclass(frozen=True, slots=True)
class Forecast:
    """Load expected ``horizon`` steps after the last value learned."""

    point: float
    upper: float
    ok: bool
    """Enough recent errors are known and they are not much worse than the naive forecast's."""
    mae: float | None
    naive_mae: float | None


class ConformalForecaster(base.Forecaster):
    """A point forecaster plus a rolling conformal upper bound at a fixed ``horizon``.

    ``horizon`` is in steps after the last learned value (one cold start, plus the step being
    decided for). ``quantile`` is the nominal coverage of the upper bound; ``window`` the
    number of recent errors it is taken over.
    """

    def __init__(self, model: base.Forecaster | None = None, horizon: int = 13,
                 quantile: float = 0.9, window: int = 240, warmup: int = 24,
                 fallback_ratio: float = 1.5) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        self.model = model if model is not None else EWMA()
        self.horizon = horizon
        self.quantile = quantile
        self.window = window
        self.warmup = warmup
        self.fallback_ratio = fallback_ratio
        self._errors = stats.RollingQuantile(quantile, window)
        # River types a Rolling wrapper as an object; it has the wrapped statistic's `get`.
        self._abs: Any = utils.Rolling(stats.Mean, window_size=window)
        self._naive_abs: Any = utils.Rolling(stats.Mean, window_size=window)
        # Forecasts made in the last `horizon` steps, oldest first: (model's, naive's).
        self._pending: deque[tuple[float, float]] = deque()
        self._last = 0.0
        self._seen = 0
        self._scored = 0

    @classmethod
    def _unit_test_params(cls) -> Any:
        yield {"horizon": 3, "window": 50, "warmup": 5}
        yield {"model": MovingAverage(4), "horizon": 2, "quantile": 0.8}

    def learn_one(self, y: float, x: dict[str, Any] | None = None) -> None:
        y = float(y)
        if len(self._pending) == self.horizon:
            predicted, naive = self._pending.popleft()
            self._errors.update(y - predicted)
            self._abs.update(abs(y - predicted))
            self._naive_abs.update(abs(y - naive))
            self._scored += 1
        self.model.learn_one(y)
        self._last = y
        self._seen += 1
        self._pending.append((self._point(), y))

    def _point(self) -> float:
        return max(float(self.model.forecast(self.horizon)[-1]), 0.0)

    def forecast(self, horizon: int, xs: list[dict[str, Any]] | None = None) -> list[float]:
        return [max(float(v), 0.0) for v in self.model.forecast(horizon)]

    def predict(self) -> Forecast:
        """Point, upper bound and trust at ``horizon`` steps after the last learned value."""
        point = self._point() if self._seen else 0.0
        if self._scored < self.warmup:
            return Forecast(point, max(point, self._last), False, None, None)
        margin = self._errors.get()
        upper = max(point + (margin if margin is not None and math.isfinite(margin) else 0.0),
                    0.0)
        mae, naive_mae = float(self._abs.get()), float(self._naive_abs.get())
        ok = mae <= self.fallback_ratio * naive_mae or mae == 0.0
        return Forecast(point, upper, ok, mae, naive_mae)


def chosen_forecaster(horizon: int, step_s: float, quantile: float = 0.9) -> ConformalForecaster:
    """The forecaster `bench/autoscale.py` chose on the first half of the Azure LLM trace.

    A 300 s moving average of load with a conformal bound over the last 20 minutes of errors
    (at least four horizons). ``step_s`` is the seconds between learned values.
    """
    steps_300s = max(1, round(300 / step_s))
    return ConformalForecaster(MovingAverage(steps_300s), horizon=horizon, quantile=quantile,
                               window=max(4 * steps_300s, 4 * horizon))
