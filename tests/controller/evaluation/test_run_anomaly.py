"""run_directory: one pass over <category>/<name>.csv, results NAB's scorer can read."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from llm_ops_helper.controller.evaluation.run_anomaly import SeriesFileError, run_directory


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("timestamp,value\n" + "".join(f"{t},{v}\n" for t, v in rows))


def test_writes_scores_and_decisions_per_file(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    flat = [(f"2024-01-01 00:{i // 60:02d}:{i % 60:02d}", "64") for i in range(300)]
    step = [*flat, ("2024-01-01 00:05:00", "91"), ("2024-01-01 00:05:01", "")]
    write(data / "gpu" / "temperature.csv", step)
    write(data / "host" / "load.csv", flat[:50])
    summary = run_directory(data, out)
    assert (summary.files, summary.rows) == (2, 352)
    with (out / "gpu" / "temperature.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["timestamp", "value", "anomaly_score", "is_anomaly"]
    assert len(rows) == 302
    assert [r["is_anomaly"] for r in rows].count("1") == 1 and rows[300]["is_anomaly"] == "1"
    assert rows[301]["value"] == "" and float(rows[301]["anomaly_score"]) == 0.0
    assert all(0.0 <= float(r["anomaly_score"]) <= 1.0 for r in rows)
    assert (out / "host" / "load.csv").exists()


def test_bad_value_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "data" / "c" / "bad.csv", [("2024-01-01 00:00:00", "1"),
                                                ("2024-01-01 00:00:01", "hot")])
    with pytest.raises(SeriesFileError, match=r"bad\.csv:3: value 'hot'"):
        run_directory(tmp_path / "data", tmp_path / "out")


def test_bad_header_and_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "data" / "c").mkdir(parents=True)
    with pytest.raises(SeriesFileError, match="no <category>"):
        run_directory(tmp_path / "data", tmp_path / "out")
    (tmp_path / "data" / "c" / "x.csv").write_text("time,v\n1,2\n")
    with pytest.raises(SeriesFileError, match=r"x\.csv:1: expected header"):
        run_directory(tmp_path / "data", tmp_path / "out")
