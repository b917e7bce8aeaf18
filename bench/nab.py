"""NAB benchmark of the controller's anomaly detector, with River's detectors as baselines.

Runs `run_anomaly.run_directory` over the NAB subset in ../shared/data/nab, scores it with the
project's NAB scorer (three profiles; the detector's own ``is_anomaly`` decisions and NAB's
optimised threshold) on the DEV half, the HOLDOUT half and all files, and does the same for
River's HalfSpaceTrees (on min-max scaled values) and GaussianScorer in the same run. Also
measures per-sample cost (learn + score) of each on one series, and the bank's batch cost per
series-sample at N = 100k series.

DEV/HOLDOUT: within each category, files sorted by name; even positions are DEV (where every
hyperparameter was chosen, with synthetic series), odd positions HOLDOUT.

    python bench/nab.py
Writes bench/results/nab.json.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from river import anomaly, preprocessing

from llm_ops_helper.controller.analytics.bank import DetectorBank
from llm_ops_helper.controller.analytics.detector import FLOAT_STATE, INT_STATE, DetectorParams
from llm_ops_helper.controller.analytics.online import OnlineDetector
from llm_ops_helper.controller.analytics.patterns import TABLE_BYTES
from llm_ops_helper.controller.evaluation import nab_score
from llm_ops_helper.controller.evaluation.run_anomaly import read_series, run_directory

HERE = Path(__file__).resolve().parent
NAB = HERE.parent.parent / "shared" / "data" / "nab"
Results = Mapping[str, tuple[Sequence[datetime], Sequence[float]]]


def split(names: Sequence[str]) -> dict[str, list[str]]:
    by_category: dict[str, list[str]] = {}
    for name in sorted(names):
        by_category.setdefault(name.split("/")[0], []).append(name)
    dev = [n for ns in by_category.values() for n in ns[0::2]]
    holdout = [n for ns in by_category.values() for n in ns[1::2]]
    return {"dev": dev, "holdout": holdout, "all": sorted(names)}


def scores(results: Results, decisions: Results | None, windows: Any,
           halves: dict[str, list[str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for half, names in halves.items():
        sub = {n: results[n] for n in names}
        row: dict[str, Any] = {}
        for profile_name, profile in nab_score.PROFILES.items():
            optimised = nab_score.score_corpus(sub, windows, profile)
            entry: dict[str, Any] = {"optimised": round(optimised.normalized, 2),
                                     "optimised_threshold": round(optimised.threshold, 6)}
            if decisions is not None:
                conf = nab_score.score_corpus({n: decisions[n] for n in names}, windows,
                                              profile, threshold=nab_score.DECISION_THRESHOLD)
                entry["configured"] = round(conf.normalized, 2)
                entry["configured_detected_windows"] = f"{conf.detected}/{conf.windows}"
                entry["configured_fp_rows"] = conf.fp
            row[profile_name] = entry
        out[half] = row
    return out


def river_results(make: Callable[[], Any], supervised: bool,
                  series: dict[str, tuple[list[datetime], list[float]]]) -> tuple[Results, float]:
    results: dict[str, tuple[Sequence[datetime], Sequence[float]]] = {}
    rows, started = 0, time.perf_counter()
    for name, (stamps, values) in series.items():
        model = make()
        out = []
        for v in values:
            if supervised:
                out.append(float(model.score_one(None, v)))
                model.learn_one(None, v)
            else:
                x = {"value": v}
                out.append(float(model.score_one(x)))
                model.learn_one(x)
        results[name] = (stamps, out)
        rows += len(values)
    return results, 1e6 * (time.perf_counter() - started) / rows


def single_series_cost(values: Sequence[float]) -> float:
    model = OnlineDetector()
    started = time.perf_counter()
    for v in values:
        x = {"value": v}
        model.score_one(x)
        model.learn_one(x)
    return 1e6 * (time.perf_counter() - started) / len(values)


def bank_cost(n: int = 100_000, ticks: int = 30) -> float:
    bank = DetectorBank(capacity=n)
    slots = np.array([bank.slot(f"host{i // 64}/s{i % 64}") for i in range(n)], np.int64)
    rng = np.random.default_rng(0)
    values = 50.0 + rng.normal(size=(ticks, n))
    started = time.perf_counter()
    for t in range(ticks):
        bank.update(slots, values[t])
    return 1e6 * (time.perf_counter() - started) / (ticks * n)


def bytes_per_series() -> int:
    """State held per series: one float64 or int64 per state field, and the pattern table."""
    return 8 * (len(FLOAT_STATE) + len(INT_STATE)) + TABLE_BYTES


def main() -> None:
    windows = nab_score.load_windows(NAB / "combined_windows.json")
    params = DetectorParams()
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_directory(NAB / "data", Path(tmp))
        read = nab_score.read_results_dir(Path(tmp))
    results = {n: (r[0], r[1]) for n, r in read.items()}
    decisions = {n: (r[0], [1.0 if d else 0.0 for d in r[2]]) for n, r in read.items()}
    halves = split(list(results))
    series = {}
    for name in results:
        _stamps, values = read_series(NAB / "data" / name)
        series[name] = (results[name][0], values)
    print("ours done", summary, file=sys.stderr)
    hst, hst_us = river_results(
        lambda: preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=42), False, series)
    print("hst done", file=sys.stderr)
    gauss, gauss_us = river_results(anomaly.GaussianScorer, True, series)
    one_series = [v for v in series[halves["dev"][3]][1]]
    report = {
        "benchmark": "nab",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "note": ("36 of NAB's 58 files (artificialWithAnomaly, realAWSCloudwatch, realAdExchange, "
                 "realTraffic): not directly comparable with published full-corpus scores "
                 "(ARTime 74.9, Numenta HTM 70.1, randomCutForest 51.7, windowedGaussian 39.6)."),
        "split": {"rule": "per category, files sorted by name: even positions DEV, odd HOLDOUT",
                  "dev_files": len(halves["dev"]), "holdout_files": len(halves["holdout"])},
        "params": params.as_dict(),
        "protocol": (
            "design v3 = v2 plus a per-series schedule of surprising events (an event whose "
            "onset repeats the last interval between onsets within 1/8, no bigger than the "
            "last scheduled one by more than 1 nat of raw surprise, has its point evidence "
            "capped) and flatline runs counted in the series' longest recent stuck run. "
            "Every design choice and hyperparameter made on synthetic series and the DEV half "
            "only: 18 DEV evaluations in round 3 (after 19 for v1/v2), each scoring all three "
            "profiles, configured and optimised. An empirical surprise-history tail (the "
            "round's first idea) was tried on DEV and dropped. HOLDOUT and ALL scored once "
            "more by this run with the design frozen: the third look at HOLDOUT (v1, v2, v3), "
            "not iterated on"),
        "ours": scores(results, decisions, windows, halves),
        "river_HalfSpaceTrees_minmax": scores(hst, None, windows, halves),
        "river_GaussianScorer": scores(gauss, None, windows, halves),
        "cost_us_per_sample": {
            "ours_single_series_learn_and_score": round(single_series_cost(one_series), 2),
            "ours_bank_per_series_sample_N100k": round(bank_cost(), 3),
            "river_HalfSpaceTrees_minmax": round(hst_us, 2),
            "river_GaussianScorer": round(gauss_us, 2),
            "ours_bytes_per_series": bytes_per_series(),
            "ours_run_directory_36_files_per_row": round(1e6 * summary.seconds / summary.rows, 2),
        },
    }
    out = HERE / "results" / "nab.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
