"""`DetectorBank`: the anomaly detector for every series the controller watches, in one object.

The controller keys series by name (``host/gpu3/temperature``), hands each tick's samples over
as two aligned arrays, and gets back aligned arrays of scores and alert decisions. State is
saved atomically in a versioned file so a restarted controller does not re-learn its fleet.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llm_ops_helper.controller.analytics import patterns
from llm_ops_helper.controller.analytics.detector import (
    FEATURES,
    FLOAT_STATE,
    INT_STATE,
    BoolArray,
    DetectorParams,
    FloatArray,
    IntArray,
    State,
    commit,
    evaluate,
)

DEFAULT_PARAMS = DetectorParams()
FORMAT = "llmops-detector-bank"
VERSION = 3


class BankFileError(ValueError):
    """A saved bank that cannot be loaded; the message names the file."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    """Arrays aligned with the `DetectorBank.update` input."""

    score: FloatArray
    """In [0, 1]; 0.5 is a one-in-1e5 surprise for this series, 0.75 one in 1e10; 0 for
    ``refractory`` samples after a detection (the anomaly has been reported)."""
    is_anomaly: BoolArray
    """The alert decision: score >= threshold."""
    feature: IntArray
    """Index into `DetectorBank.FEATURES`: what drove the score."""
    expected: FloatArray
    """What the driving feature expected the value to be; NaN for a missing value."""


class DetectorBank:
    """One detector per series key, updated in vectorised batches (see `detector`)."""

    FEATURES: tuple[str, ...] = FEATURES

    def __init__(self, params: DetectorParams = DEFAULT_PARAMS, capacity: int = 1024) -> None:
        self.params = params
        self._state = State(max(capacity, 1))
        self._keys: list[str] = []  # by slot; "" marks a slot freed by forget()
        self._index: dict[str, int] = {}
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._index)

    def slot(self, key: str) -> int:
        """The slot of series ``key``, allocating one (and growing the arrays) if it is new."""
        found = self._index.get(key)
        if found is not None:
            return found
        if not key:
            raise ValueError("a series key must not be empty")
        if self._free:
            n = self._free.pop()
            self._keys[n] = key
        else:
            n = len(self._keys)
            if n >= self._state.capacity:
                self._state.grow(2 * self._state.capacity)
            self._keys.append(key)
        self._index[key] = n
        return n

    def forget(self, keys: list[str]) -> list[int]:
        """Drop the models of ``keys`` (series that are gone); their slots are reused, reset.

        Returns the slots freed. A series that comes back later starts learning afresh.
        """
        freed = [self._index.pop(k) for k in keys if k in self._index]
        if freed:
            rows = np.asarray(freed, dtype=np.int64)
            for table in (self._state.floats, self._state.ints):
                for arr in table.values():
                    arr[rows] = 0
            self._state.table[rows] = 0
            for n in freed:
                self._keys[n] = ""
            self._free.extend(freed)
        return freed

    def keys(self) -> list[str]:
        return list(self._keys)

    def learned(self, slots: npt.ArrayLike) -> IntArray:
        """How many values each of ``slots`` has learned (its history, in samples)."""
        count: IntArray = self._state.ints["count"][np.asarray(slots, dtype=np.int64)]
        return count

    def update(self, slots: npt.ArrayLike, values: npt.ArrayLike) -> BatchResult:
        """Score each (slot, value) before learning it, then learn it.

        A NaN (or infinite) value is missing: it scores 0 and leaves the state untouched.
        Repeated slots (a host replaying buffered samples) are processed in their order, in
        rounds of distinct slots, so the result equals feeding them one at a time.
        """
        s = np.asarray(slots, dtype=np.int64).ravel()
        x = np.asarray(values, dtype=np.float64).ravel()
        if s.shape != x.shape:
            raise ValueError(f"slots and values differ in length: {s.size} != {x.size}")
        if s.size and (s.min() < 0 or s.max() >= len(self._keys)):
            raise IndexError("update: a slot was not allocated by slot()")
        n = s.size
        score = np.zeros(n)
        fire = np.zeros(n, dtype=np.bool_)
        feature = np.zeros(n, dtype=np.int64)
        expected = np.full(n, np.nan)
        ok = np.flatnonzero(np.isfinite(x))
        for positions in _rounds(s[ok]):
            idx = ok[positions]
            e = evaluate(self._state, s[idx], x[idx], self.params)
            commit(self._state, s[idx], e)
            score[idx], fire[idx], feature[idx], expected[idx] = (
                e.score, e.is_anomaly, e.feature, e.expected)
        return BatchResult(score=score, is_anomaly=fire, feature=feature, expected=expected)

    def save(self, path: Path) -> None:
        """Write the bank to ``path`` atomically (a temporary file, then ``os.replace``)."""
        self.snapshot()(path)

    def snapshot(self) -> Callable[[Path], None]:
        """A copy of the state now, and the function that writes it (``save`` in two halves).

        The copy is quick; the writing (tens of MB for a big fleet, with an fsync) can then run
        in a worker thread while the bank goes on learning.
        """
        meta = {"format": FORMAT, "version": VERSION, "params": self.params.as_dict(),
                "keys": list(self._keys)}
        n = len(self._keys)
        arrays: dict[str, Any] = {name: arr[:n].copy()
                                  for table in (self._state.floats, self._state.ints)
                                  for name, arr in table.items()}
        arrays["table"] = self._state.table[:n].copy()
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        return functools.partial(_write, arrays=arrays)

    @classmethod
    def load(cls, path: Path) -> DetectorBank:
        """Restore a bank written by `save`; behaves exactly as the saved one would."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise BankFileError(f"{path}: not a detector bank file")
                if meta.get("version") != VERSION:
                    raise BankFileError(f"{path}: detector bank format version "
                                        f"{meta.get('version')!r}, this code reads {VERSION}")
                arrays = {k: np.array(data[k]) for k in (*FLOAT_STATE, *INT_STATE)}
                table = np.array(data["table"])
            keys = [str(k) for k in meta["keys"]]
            params = _params_from(meta["params"])
        except BankFileError:
            raise
        except FileNotFoundError:
            raise BankFileError(f"{path}: detector bank file not found") from None
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise BankFileError(f"{path}: cannot read detector bank: {exc}") from None
        if any(len(a) != len(keys) for a in arrays.values()) or table.shape != (
                len(keys), patterns.TABLE_BYTES) or table.dtype != np.uint8:
            raise BankFileError(f"{path}: state arrays do not match the {len(keys)} keys")
        bank = cls(params, capacity=max(len(keys), 1))
        for k in FLOAT_STATE:
            bank._state.floats[k][: len(keys)] = arrays[k]
        for k in INT_STATE:
            bank._state.ints[k][: len(keys)] = arrays[k]
        bank._state.table[: len(keys)] = table
        bank._keys = keys
        bank._index = {k: i for i, k in enumerate(keys) if k}
        bank._free = [i for i, k in enumerate(keys) if not k]
        if len(bank._index) + len(bank._free) != len(keys):
            raise BankFileError(f"{path}: duplicate series keys")
        return bank


def _write(path: Path, arrays: dict[str, Any]) -> None:
    # Unique per writer: a background checkpoint may still run when the final one starts.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with tmp.open("wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _params_from(raw: object) -> DetectorParams:
    if not isinstance(raw, dict):
        raise TypeError("params is not an object")
    kwargs: dict[str, float | int] = {}
    for f in fields(DetectorParams):
        value = float(raw[f.name])
        kwargs[f.name] = int(value) if f.type in (int, "int") else value
    return DetectorParams(**kwargs)  # type: ignore[arg-type]


def _rounds(slots: IntArray) -> list[IntArray]:
    """Positions of ``slots`` split into rounds of distinct slots, each in input order.

    Round r holds every slot's (r+1)-th occurrence, so feeding the rounds in turn processes
    each slot's values in their order.
    """
    if slots.size == 0:
        return []
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    starts = np.r_[True, sorted_slots[1:] != sorted_slots[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(slots.size), 0))
    rank = np.empty(slots.size, np.int64)
    rank[order] = np.arange(slots.size) - group_start
    if rank.max() == 0:
        return [np.arange(slots.size)]
    return [np.flatnonzero(rank == r) for r in range(int(rank.max()) + 1)]
