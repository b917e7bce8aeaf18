"""The elementwise functions the detector's math needs, for arrays (the bank) and floats.

`detector.score_and_learn` is written once against these: `Ops` runs it on numpy arrays of
many series, `ScalarOps` on one series' floats (`OnlineDetector`), with branches instead of
masks. Transcendentals and table look-ups stay numpy's in both, so a single series scores bit
for bit as in the bank.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
ByteArray = npt.NDArray[np.uint8]


class Ops:
    """Elementwise functions on numpy arrays."""

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

    @staticmethod
    def to_int(a: Any) -> Any:
        """Truncate floats already clipped to a small non-negative range."""
        return np.asarray(a).astype(np.int64)


class ScalarOps(Ops):
    """The same functions for one float: plain branches, numpy's transcendentals."""

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

    @staticmethod
    def to_int(a: Any) -> Any:
        return int(a)
