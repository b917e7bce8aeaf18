"""The Numenta Anomaly Benchmark score (Lavin & Ahmad 2015), as NAB's own code computes it.

Re-implemented from numenta/NAB (`nab/sweeper.py`, `nab/scorer.py`, `nab/runner.py`,
`nab/util.py`, `config/profiles.json`) rather than from the paper, because the published
numbers come from the code and the two differ in details that move scores:

* A detection inside a window scores ``tpWeight * scaledSigmoid(pos) / scaledSigmoid(-1)``
  with ``pos = -(right - i + 1) / width``: the first row scores exactly ``tpWeight``, the
  last ``scaledSigmoid(-1/width) / 0.9866``. Only the best (earliest) detection counts.
* A detection outside every window scores ``fpWeight * scaledSigmoid((i - right) / (width - 1))``
  of the previous window, which is -fpWeight exactly once that position is past 3.0 and
  before any window.
* Rows of the probationary period, ``min(floor(0.15 * rows), 0.15 * 5000)``, are dropped.
* TP/FP/FN/TN are counts of *rows*, not windows (the sweeper counts rows).
* One threshold for the whole corpus, chosen by sweeping every distinct anomaly score from
  the top (starting at 1.1: nothing detected) and keeping the first best.
* Normalised: ``100 * (raw - null) / (perfect - null)``; null is the score when nothing is
  detected, perfect is ``tpWeight`` times the number of labelled windows.

The sweep is vectorised with numpy: the whole 36-file corpus sweeps in well under a second.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

PROBATION_PERCENT = 0.15
# NAB's sweep starts above every score in [0, 1], i.e. with nothing detected.
NOTHING_THRESHOLD = 1.1
# The threshold that turns 0/1 decisions (the `is_anomaly` column) into exactly themselves.
DECISION_THRESHOLD = 0.5

Window = tuple[datetime, datetime]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
# Data file -> (timestamps, anomaly scores, anything else, e.g. `read_results_dir`'s decisions).
Results = Mapping[str, tuple[Sequence[datetime], Sequence[float], *tuple[Any, ...]]]


class NabDataError(ValueError):
    """A results, data or windows file that cannot be scored; the message names file and row."""


@dataclass(frozen=True)
class Profile:
    """A NAB application profile (a cost matrix from NAB's config/profiles.json)."""

    name: str
    tp: float
    fp: float
    fn: float
    tn: float = 1.0


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("standard", tp=1.0, fp=0.11, fn=1.0),
    Profile("reward_low_FP_rate", tp=1.0, fp=0.22, fn=1.0),
    Profile("reward_low_FN_rate", tp=1.0, fp=0.11, fn=2.0),
)}


@dataclass(frozen=True)
class FileScore:
    """One file's raw NAB score at one threshold. tp/fp/fn/tn count rows, as NAB does."""

    raw: float
    tp: int
    fp: int
    fn: int
    tn: int
    windows: int  # labelled windows with at least one row after the probationary period
    detected: int  # of those, windows with at least one detection


@dataclass(frozen=True)
class ThresholdScore:
    """One step of NAB's threshold sweep: the corpus score when scores >= threshold fire."""

    threshold: float
    score: float
    tp: int
    tn: int
    fp: int
    fn: int


@dataclass(frozen=True)
class CorpusScore:
    """The corpus score for one profile at one global threshold."""

    profile: Profile
    threshold: float
    normalized: float
    raw: float
    null: float
    perfect: float
    per_file: dict[str, FileScore]
    tp: int
    fp: int
    fn: int
    tn: int
    windows: int
    detected: int


def scaled_sigmoid(position: FloatArray) -> FloatArray:
    """NAB's ``scaledSigmoid``: ``2*sigmoid(-5x) - 1``, and exactly -1 for x > 3."""
    clipped = np.minimum(position, 3.0)  # avoids exp overflow; those rows are -1 anyway
    value: FloatArray = np.where(position > 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * clipped)) - 1.0)
    return value


_MAX_TP = float(scaled_sigmoid(np.array([-1.0]))[0])  # 0.98661..., NAB's `maxTP`


@dataclass(frozen=True)
class _File:
    """A file ready to score: per-row window ids and unweighted NAB sweep scores."""

    scores: FloatArray
    window: IntArray  # index into this file's windows, -1 outside every window
    unweighted: FloatArray  # sigmoid part; times tpWeight inside a window, fpWeight outside
    scorable: BoolArray  # after the probationary period
    windows: int  # labelled windows
    scorable_windows: int

    def weighted(self, profile: Profile) -> FloatArray:
        weights = np.where(self.window >= 0, profile.tp, profile.fp)
        out: FloatArray = self.unweighted * weights
        return out


def probationary_length(rows: int) -> float:
    """NAB's ``getProbationPeriod``: rows before this index are never scored."""
    return min(math.floor(PROBATION_PERCENT * rows), PROBATION_PERCENT * 5000)


def _prepare(name: str, timestamps: Sequence[datetime], scores: Sequence[float],
             windows: Sequence[Window]) -> _File:
    if len(timestamps) != len(scores):
        raise NabDataError(f"{name}: {len(timestamps)} timestamps but {len(scores)} scores")
    values = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        row = int(np.flatnonzero(~np.isfinite(values))[0])
        raise NabDataError(f"{name}: row {row}: anomaly score {values[row]} is not finite")
    rows = len(values)
    index: dict[datetime, int] = {}
    for i, t in enumerate(timestamps):
        index.setdefault(t, i)  # NAB's `timestamps.index`: the first occurrence
    bounds: list[tuple[int, int]] = []
    for start, end in windows:
        if start not in index or end not in index:
            missing = start if start not in index else end
            raise NabDataError(f"{name}: window [{start}, {end}]: {missing} is not a row's "
                               "timestamp (NAB's windows must match rows exactly)")
        left, right = index[start], index[end]
        if right < left or (bounds and left <= bounds[-1][1]):
            raise NabDataError(f"{name}: window [{start}, {end}] is reversed, out of order "
                               "or overlaps the previous one")
        if right == left and right < rows - 1:
            # NAB divides by (width - 1) for every row after a window: it would crash here.
            raise NabDataError(f"{name}: window [{start}, {end}] is one row wide; NAB cannot "
                               "score the rows after it")
        bounds.append((left, right))

    ix = np.arange(rows)
    window = np.full(rows, -1, dtype=np.int64)
    unweighted = np.full(rows, -1.0)  # before any window: exactly -1 (NAB)
    rights = np.array([r for _, r in bounds], dtype=np.int64)
    widths = np.array([r - lo + 1 for lo, r in bounds], dtype=np.float64)
    for w, (left, right) in enumerate(bounds):
        window[left:right + 1] = w
        position = -(right - ix[left:right + 1] + 1) / widths[w]
        unweighted[left:right + 1] = scaled_sigmoid(position) / _MAX_TP
    outside = window < 0
    previous = np.searchsorted(rights, ix, side="left") - 1  # last window ending before each ix
    after = outside & (previous >= 0)
    if after.any():
        prev = previous[after]
        position = (ix[after] - rights[prev]) / (widths[prev] - 1.0)
        unweighted[after] = scaled_sigmoid(position)
    scorable = ix >= probationary_length(rows)
    first_scorable = int(np.argmax(scorable)) if scorable.any() else rows
    return _File(scores=values, window=window, unweighted=unweighted, scorable=scorable,
                 windows=len(bounds),
                 scorable_windows=sum(1 for _, r in bounds if r >= first_scorable))


def _score_at(f: _File, profile: Profile, threshold: float) -> FileScore:
    fired = f.scorable & (f.scores >= threshold)
    inside = f.window >= 0
    weighted = f.weighted(profile)
    fp_part = math.fsum(weighted[fired & ~inside])
    # Each scorable window starts at -fnWeight and takes the max of its detections' scores.
    best = np.full(f.windows, -profile.fn)
    hits = fired & inside
    np.maximum.at(best, f.window[hits], weighted[hits])
    alive = np.zeros(f.windows, dtype=bool)
    alive[f.window[f.scorable & inside]] = True
    detected = np.zeros(f.windows, dtype=bool)
    detected[f.window[hits]] = True
    return FileScore(
        raw=fp_part + math.fsum(best[alive]),
        tp=int(np.count_nonzero(hits)),
        fp=int(np.count_nonzero(fired & ~inside)),
        fn=int(np.count_nonzero(f.scorable & inside & ~fired)),
        tn=int(np.count_nonzero(f.scorable & ~inside & ~fired)),
        windows=int(np.count_nonzero(alive)),
        detected=int(np.count_nonzero(detected)),
    )


def score_file(timestamps: Sequence[datetime], scores: Sequence[float],
               windows: list[Window], profile: Profile, threshold: float) -> FileScore:
    """One file's raw NAB score when rows with ``score >= threshold`` fire."""
    return _score_at(_prepare("<file>", timestamps, scores, windows), profile, threshold)


def _prepare_corpus(results: Results,
                    windows: Mapping[str, Sequence[Window]]) -> dict[str, _File]:
    if not results:
        raise NabDataError("no results files to score")
    prepared: dict[str, _File] = {}
    for name in sorted(results):
        if name not in windows:
            raise NabDataError(f"{name}: no entry in the windows file")
        timestamps, scores = results[name][0], results[name][1]
        prepared[name] = _prepare(name, timestamps, scores, windows[name])
    return prepared


def _sweep(files: Mapping[str, _File], profile: Profile) -> list[ThresholdScore]:
    """NAB's ``calcScoreByThreshold`` over the whole corpus, vectorised.

    Rows are taken in descending score; each adds its own score if outside a window, or
    raises its window's running max (from -fnWeight) if inside. The corpus score after the
    last row of each distinct score value is that threshold's score.
    """
    scores = np.concatenate([f.scores[f.scorable] for f in files.values()])
    weighted = np.concatenate([f.weighted(profile)[f.scorable] for f in files.values()])
    offsets = np.cumsum([0] + [f.windows for f in files.values()])[:-1]
    window = np.concatenate([np.where(f.window[f.scorable] >= 0, f.window[f.scorable] + off, -1)
                             for f, off in zip(files.values(), offsets, strict=True)])
    null = -profile.fn * sum(f.scorable_windows for f in files.values())
    top = max(NOTHING_THRESHOLD, float(np.nextafter(scores.max(), np.inf))) if scores.size \
        else NOTHING_THRESHOLD
    nothing_tn = int(np.count_nonzero(window < 0))
    nothing_fn = int(scores.size - nothing_tn)
    steps = [ThresholdScore(top, null, 0, nothing_tn, 0, nothing_fn)]
    if not scores.size:
        return steps

    order = np.argsort(-scores, kind="stable")
    s, v, w = scores[order], weighted[order], window[order]
    gain = np.where(w < 0, v, 0.0)
    inside = np.flatnonzero(w >= 0)
    by_window = inside[np.argsort(w[inside], kind="stable")]  # keeps descending-score order
    cuts = np.flatnonzero(np.diff(w[by_window])) + 1
    for rows in np.split(by_window, cuts):
        running = np.maximum.accumulate(np.maximum(v[rows], -profile.fn))
        gain[rows] = np.diff(running, prepend=-profile.fn)  # 0.0 exactly when no new max
    total = null + np.cumsum(gain)
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    tp = np.cumsum(w >= 0)[ends]
    fp = np.cumsum(w < 0)[ends]
    steps.extend(ThresholdScore(float(s[e]), float(total[e]), int(tp[k]), nothing_tn - int(fp[k]),
                                int(fp[k]), nothing_fn - int(tp[k]))
                 for k, e in enumerate(ends))
    return steps


def sweep_thresholds(results: Results,
                     windows: Mapping[str, Sequence[Window]],
                     profile: Profile) -> list[ThresholdScore]:
    """Every candidate threshold of NAB's sweep, highest first (the first is "nothing fires")."""
    return _sweep(_prepare_corpus(results, windows), profile)


def _best(steps: list[ThresholdScore]) -> ThresholdScore:
    # NAB sorts by score with a stable sort and takes the first: ties go to the higher threshold.
    return max(steps, key=lambda step: step.score)


def optimise_threshold(results: Results,
                       windows: Mapping[str, Sequence[Window]], profile: Profile) -> ThresholdScore:
    """NAB's optimiser: the sweep step with the highest corpus score."""
    return _best(sweep_thresholds(results, windows, profile))


def score_corpus(results: Results,
                 windows: Mapping[str, Sequence[Window]], profile: Profile,
                 threshold: float | None = None) -> CorpusScore:
    """Score a corpus at one global threshold; ``None`` picks it as NAB's optimiser does.

    ``results`` maps a data file (``"realTraffic/speed_6005.csv"``) to its timestamps and
    anomaly scores (extra tuple items are ignored, so `read_results_dir` output fits). Only
    the files in ``results`` are scored; each needs an entry in ``windows``.
    """
    files = _prepare_corpus(results, windows)
    if threshold is None:
        threshold = _best(_sweep(files, profile)).threshold
    per_file = {name: _score_at(f, profile, threshold) for name, f in files.items()}
    null = -profile.fn * sum(f.scorable_windows for f in files.values())
    perfect = profile.tp * sum(f.windows for f in files.values())
    if perfect == null:
        raise NabDataError("the scored files have no labelled windows: the score is undefined")
    raw = math.fsum(s.raw for s in per_file.values())
    return CorpusScore(
        profile=profile, threshold=threshold,
        normalized=100.0 * (raw - null) / (perfect - null), raw=raw, null=null,
        perfect=perfect, per_file=per_file,
        tp=sum(s.tp for s in per_file.values()), fp=sum(s.fp for s in per_file.values()),
        fn=sum(s.fn for s in per_file.values()), tn=sum(s.tn for s in per_file.values()),
        windows=sum(s.windows for s in per_file.values()),
        detected=sum(s.detected for s in per_file.values()),
    )


def score_decisions(results: Mapping[str, tuple[Sequence[datetime], Sequence[bool]]],
                    windows: Mapping[str, Sequence[Window]], profile: Profile) -> CorpusScore:
    """Score binary decisions as they are: a row fires iff its decision is true.

    This is the detector's own threshold (the ``is_anomaly`` column), not NAB's optimised one.
    """
    as_scores = {name: (item[0], [1.0 if d else 0.0 for d in item[1]])
                 for name, item in results.items()}
    return score_corpus(as_scores, windows, profile, threshold=DECISION_THRESHOLD)


def parse_timestamp(text: str, where: str) -> datetime:
    """NAB's timestamps (``2014-04-10 07:15:00`` with optional fraction); errors name `where`."""
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise NabDataError(f"{where}: cannot parse timestamp {text!r}") from None


def load_windows(path: Path) -> dict[str, list[Window]]:
    """NAB's ``combined_windows.json``: data file -> list of inclusive [start, end] windows."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise NabDataError(f"{path}: windows file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NabDataError(f"{path}: cannot read windows file: {exc}") from None
    if not isinstance(raw, dict):
        raise NabDataError(f"{path}: expected an object of file -> windows")
    out: dict[str, list[Window]] = {}
    for name, pairs in raw.items():
        where = f"{path}: {name}"
        if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) for t in p)
                for p in pairs):
            raise NabDataError(f"{where}: expected a list of [start, end] timestamp pairs")
        out[name] = [(parse_timestamp(a, where), parse_timestamp(b, where)) for a, b in pairs]
    return out


_TRUE = {"1", "true", "t", "yes"}
_FALSE = {"0", "false", "f", "no", ""}


def _read_results_file(path: Path) -> tuple[list[datetime], list[float], list[bool]]:
    timestamps: list[datetime] = []
    scores: list[float] = []
    flags: list[bool] = []
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in ("timestamp", "anomaly_score", "is_anomaly")
                       if c not in (reader.fieldnames or [])]
            if missing:
                raise NabDataError(f"{path}: missing column(s) {', '.join(missing)} "
                                   f"(header: {reader.fieldnames})")
            for line, row in enumerate(reader, start=2):
                where = f"{path}:{line}"
                timestamps.append(parse_timestamp(row["timestamp"] or "", where))
                try:
                    scores.append(float(row["anomaly_score"] or ""))
                except ValueError:
                    raise NabDataError(f"{where}: column anomaly_score: cannot parse "
                                       f"{row['anomaly_score']!r} as a number") from None
                flag = (row["is_anomaly"] or "").strip().lower()
                if flag not in _TRUE | _FALSE:
                    raise NabDataError(f"{where}: column is_anomaly: expected true/false or "
                                       f"1/0, got {row['is_anomaly']!r}")
                flags.append(flag in _TRUE)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise NabDataError(f"{path}: cannot read results file: {exc}") from None
    return timestamps, scores, flags


def read_results_dir(out_dir: Path) -> dict[str, tuple[list[datetime], list[float], list[bool]]]:
    """Read ``OUT/<category>/<name>.csv`` (timestamp,value,anomaly_score,is_anomaly).

    Keys are NAB data paths (``"realTraffic/speed_6005.csv"``); values are timestamps,
    anomaly scores and the detector's own decisions.
    """
    if not out_dir.is_dir():
        raise NabDataError(f"{out_dir}: results directory not found")
    paths = sorted(out_dir.glob("*/*.csv"))
    if not paths:
        raise NabDataError(f"{out_dir}: no <category>/<name>.csv results files")
    return {f"{p.parent.name}/{p.name}": _read_results_file(p) for p in paths}
