"""Run the controller's anomaly detector over a directory of NAB-style series, one pass.

Each ``<category>/<name>.csv`` (``timestamp,value``) is fed online, in file order, through a
`DetectorBank` (every file is a series of one bank, stepped together: scoring happens before
learning and no sample sees a later one), and ``OUT/<category>/<name>.csv`` gets
``timestamp,value,anomaly_score,is_anomaly``: what `nab_score.read_results_dir` reads.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_ops_helper.controller.analytics.bank import DetectorBank
from llm_ops_helper.controller.analytics.detector import DetectorParams


class SeriesFileError(ValueError):
    """A data file that cannot be read as ``timestamp,value``; the message names file and line."""


@dataclass(frozen=True, slots=True)
class RunSummary:
    files: int
    rows: int
    seconds: float


def read_series(path: Path) -> tuple[list[str], list[float]]:
    """A ``timestamp,value`` CSV; an empty value is a missing sample (NaN)."""
    timestamps: list[str] = []
    values: list[float] = []
    try:
        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["timestamp", "value"]:
                raise SeriesFileError(f"{path}:1: expected header timestamp,value, got {header}")
            for line, row in enumerate(reader, start=2):
                if len(row) < 2:
                    raise SeriesFileError(f"{path}:{line}: expected timestamp,value, got {row}")
                text = row[1].strip()
                try:
                    values.append(float(text) if text else math.nan)
                except ValueError:
                    raise SeriesFileError(
                        f"{path}:{line}: value {row[1]!r} is not a number") from None
                timestamps.append(row[0])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SeriesFileError(f"{path}: cannot read: {exc}") from None
    return timestamps, values


def run_directory(data_dir: Path, out_dir: Path,
                  params: DetectorParams | None = None) -> RunSummary:
    """Detect anomalies in every ``data_dir/<category>/<name>.csv``; write ``out_dir`` alike."""
    paths = sorted(data_dir.glob("*/*.csv"))
    if not paths:
        raise SeriesFileError(f"{data_dir}: no <category>/<name>.csv files")
    series = [read_series(p) for p in paths]
    started = time.perf_counter()
    bank = DetectorBank(params or DetectorParams(), capacity=len(paths))
    slots = np.array([bank.slot(str(p.relative_to(data_dir))) for p in paths], np.int64)
    length = max(len(v) for _, v in series)
    grid = np.full((length, len(paths)), np.nan)
    present = np.zeros((length, len(paths)), np.bool_)
    for j, (_, values) in enumerate(series):
        grid[: len(values), j] = values
        present[: len(values), j] = True
    scores = np.zeros_like(grid)
    fired = np.zeros_like(present)
    for t in range(length):
        cols = np.flatnonzero(present[t])
        result = bank.update(slots[cols], grid[t, cols])
        scores[t, cols] = result.score
        fired[t, cols] = result.is_anomaly
    seconds = time.perf_counter() - started
    for j, (path, (timestamps, values)) in enumerate(zip(paths, series, strict=True)):
        target = out_dir / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["timestamp", "value", "anomaly_score", "is_anomaly"])
            for t, (stamp, value) in enumerate(zip(timestamps, values, strict=True)):
                writer.writerow([stamp, "" if math.isnan(value) else repr(value),
                                 repr(float(scores[t, j])), int(fired[t, j])])
    return RunSummary(files=len(paths), rows=sum(len(v) for _, v in series), seconds=seconds)
