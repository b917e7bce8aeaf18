"""The NAB scorer against hand-computed cases, a literal port of NAB's sweeper, and real NAB data."""

from __future__ import annotations

import csv
import math
import random
import time
from collections import namedtuple
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from llm_ops_helper.controller.evaluation.nab_score import (
    PROFILES,
    NabDataError,
    Profile,
    load_windows,
    optimise_threshold,
    parse_timestamp,
    read_results_dir,
    score_corpus,
    score_decisions,
    score_file,
    sweep_thresholds,
)
from tests.conftest import shared_data

STANDARD = PROFILES["standard"]
T0 = datetime(2014, 4, 1)
MAX_TP = 2 / (1 + math.exp(-5)) - 1  # scaledSigmoid(-1) = 0.98661...


def stamps(n: int) -> list[datetime]:
    return [T0 + timedelta(minutes=5 * i) for i in range(n)]


def fire(n: int, *rows: int) -> list[float]:
    return [1.0 if i in rows else 0.0 for i in range(n)]


# 100 rows: rows 0-14 are probationary (floor(0.15 * 100)); one window over rows 40-49.
TS = stamps(100)
WINDOW = [(TS[40], TS[49])]


def raw(*rows: int, profile: Profile = STANDARD) -> float:
    return score_file(TS, fire(100, *rows), WINDOW, profile, threshold=0.5).raw


def test_profiles_are_nabs_cost_matrices() -> None:
    assert {(p.name, p.tp, p.fp, p.fn, p.tn) for p in PROFILES.values()} == {
        ("standard", 1.0, 0.11, 1.0, 1.0), ("reward_low_FP_rate", 1.0, 0.22, 1.0, 1.0),
        ("reward_low_FN_rate", 1.0, 0.11, 2.0, 1.0)}


def test_detection_at_a_windows_first_row_scores_the_full_tp_weight() -> None:
    # scaledSigmoid(-1) = 0.98661, but NAB divides by it (`/ maxTP`), so the first row is worth 1.
    assert pytest.approx(0.98661, abs=1e-5) == MAX_TP
    score = score_file(TS, fire(100, 40), WINDOW, STANDARD, threshold=0.5)
    assert score.raw == pytest.approx(1.0, abs=1e-12)
    assert (score.tp, score.fp, score.fn, score.tn, score.detected) == (1, 0, 9, 75, 1)


def test_detection_at_a_windows_last_row_scores_sigmoid_of_minus_one_over_width() -> None:
    # position = -(right - i + 1) / width = -1/10 at the last row, not 0.
    expected = (2 / (1 + math.exp(-0.5)) - 1) / MAX_TP
    assert expected == pytest.approx(0.248241, abs=1e-6)
    assert raw(49) == pytest.approx(expected, abs=1e-12)


def test_only_the_earliest_detection_in_a_window_counts() -> None:
    assert raw(40, 45, 49) == pytest.approx(raw(40), abs=1e-12)
    assert raw(45, 49) == pytest.approx(raw(45), abs=1e-12)
    assert raw(49) < raw(45) < raw(40)


def test_false_positive_far_from_any_window_costs_exactly_the_fp_weight() -> None:
    for profile in PROFILES.values():
        before = raw(20, profile=profile)  # no preceding window: exactly -1 * fpWeight
        far = raw(90, profile=profile)  # (90 - 49) / (10 - 1) = 4.6 > 3: exactly -1 * fpWeight
        assert before == far == -profile.fp - profile.fn


def test_false_positive_just_after_a_window_costs_less() -> None:
    # Row 50 follows the window's last row 49: position 1 / (width - 1) = 1/9.
    cost = (2 / (1 + math.exp(5 / 9)) - 1) * 0.11
    assert cost == pytest.approx(-0.0297932, abs=1e-7)
    assert raw(50) == pytest.approx(-1.0 + cost, abs=1e-12)
    assert raw(40, 50) == pytest.approx(1.0 + cost, abs=1e-12)
    assert -0.11 < raw(60) + 1 < raw(50) + 1 < 0  # the cost grows with the distance


def test_detections_in_the_probationary_period_are_ignored() -> None:
    assert raw(0, 5, 14) == raw() == -1.0  # rows 0-14 of 100
    assert raw(15) == pytest.approx(-1.11)
    # The period is capped at 0.15 * 5000 = 750 rows.
    ts = stamps(6000)
    window = [(ts[3000], ts[3099])]
    assert score_file(ts, fire(6000, 749), window, STANDARD, 0.5).raw == -1.0
    assert score_file(ts, fire(6000, 750), window, STANDARD, 0.5).raw == pytest.approx(-1.11)


def test_a_missed_window_costs_the_fn_weight() -> None:
    assert raw(profile=PROFILES["reward_low_FN_rate"]) == -2.0
    two = [(TS[40], TS[49]), (TS[70], TS[79])]
    score = score_file(TS, fire(100, 41), two, STANDARD, threshold=0.5)
    assert score.raw == pytest.approx(raw(41) - 1.0, abs=1e-12)
    assert (score.windows, score.detected) == (2, 1)


def test_null_detector_scores_0_and_perfect_detector_100() -> None:
    windows = {"a/one.csv": WINDOW, "b/two.csv": [(TS[30], TS[39]), (TS[70], TS[89])]}
    null = {"a/one.csv": (TS, fire(100)), "b/two.csv": (TS, fire(100))}
    perfect = {"a/one.csv": (TS, fire(100, 40)), "b/two.csv": (TS, fire(100, 30, 70))}
    for profile in PROFILES.values():
        never = score_corpus(null, windows, profile, threshold=0.5)
        assert (never.normalized, never.raw, never.null) == (0.0, -3 * profile.fn, -3 * profile.fn)
        assert never.perfect == 3 * profile.tp
        assert score_corpus(perfect, windows, profile, threshold=0.5).normalized == \
            pytest.approx(100.0, abs=1e-9)
        # The optimiser on the null detector keeps "nothing fires", NAB's baseline.
        assert score_corpus(null, windows, profile).normalized == 0.0


def test_decisions_are_scored_as_they_are() -> None:
    windows = {"a/one.csv": WINDOW}
    flags = [i in (40, 90) for i in range(100)]
    by_flag = score_decisions({"a/one.csv": (TS, flags)}, windows, STANDARD)
    assert by_flag.threshold == 0.5
    assert by_flag.raw == pytest.approx(1.0 - 0.11)
    assert by_flag.normalized == pytest.approx(100 * (0.89 + 1) / 2)
    assert (by_flag.tp, by_flag.fp, by_flag.fn) == (1, 1, 9)


def test_optimiser_finds_the_best_threshold_on_a_small_corpus() -> None:
    # a: 0.9 at the window's first row; 0.7 on 20 rows just after it; 0.95 on a far row.
    # b: 0.6 inside its window's second half; 0.8 on two rows before its window.
    a = [0.0] * 100
    a[40], a[90] = 0.9, 0.95
    for i in range(55, 75):
        a[i] = 0.7
    b = [0.0] * 100
    b[47] = 0.6
    b[20] = b[21] = 0.8
    results = {"a/x.csv": (TS, a), "b/y.csv": (TS, b)}
    windows = {"a/x.csv": WINDOW, "b/y.csv": WINDOW}
    best = score_corpus(results, windows, STANDARD)
    # By hand, from null = -2: 0.95 -> -2.11; 0.9 -> -0.11 (a's window caught at its first row);
    # 0.8 -> -0.33; 0.7 -> -2.51 (20 FPs 6-25 rows after a's window); 0.6 -> -0.87.
    assert best.threshold == 0.9
    assert best.raw == pytest.approx(-0.11, abs=1e-12)
    assert best.normalized == pytest.approx(100 * (2 - 0.11) / 4)
    brute = max((score_corpus(results, windows, STANDARD, threshold=t).raw, -t)
                for t in (1.1, 0.95, 0.9, 0.8, 0.7, 0.6, 0.0))
    assert (brute[0], -brute[1]) == pytest.approx((best.raw, best.threshold))
    # Rewarding low FN (fn 2): catching b's window late at 0.6 is worth a's 20 nearby FPs.
    low_fn = score_corpus(results, windows, PROFILES["reward_low_FN_rate"])
    late_tp = (2 / (1 + math.exp(-1.5)) - 1) / MAX_TP  # row 47 of 40-49: position -3/10
    assert low_fn.threshold == 0.6
    assert low_fn.raw == pytest.approx(-0.868227, abs=1e-6)
    assert low_fn.per_file["b/y.csv"].raw == pytest.approx(late_tp - 0.22, abs=1e-12)


# A literal port of NAB's nab/sweeper.py (calcSweepScore, calcScoreByThreshold) and of the
# optimiser's "sort by score, take the first", to check the vectorised sweep against.
Point = namedtuple("Point", "score sweep window")


def nab_sweep_reference(results: dict[str, tuple[list[datetime], list[float]]],
                        windows: dict[str, list[tuple[datetime, datetime]]],
                        p: Profile) -> list[tuple[float, float, int, int, int, int]]:
    def scaled(x: float) -> float:
        return -1.0 if x > 3.0 else 2 * (1 / (1 + math.exp(5 * x))) - 1.0

    points: list[Point] = []
    for name, (ts, scores) in results.items():
        limits = list(windows[name])
        max_tp = scaled(-1.0)
        probation = min(math.floor(0.15 * len(ts)), 0.15 * 5000)
        cur = cur_name = cur_width = cur_right = prev_width = prev_right = None
        for i, (t, s) in enumerate(zip(ts, scores, strict=True)):
            if limits and t == limits[0][0]:
                cur = limits.pop(0)
                cur_name = f"{name}|{cur[0]}"
                cur_right = ts.index(cur[1])
                cur_width = float(cur_right - ts.index(cur[0]) + 1)
            if cur is not None:
                weighted = scaled(-(cur_right - i + 1) / cur_width) * p.tp / max_tp
            else:
                unweighted = -1.0 if prev_right is None else scaled(abs(prev_right - i) / (prev_width - 1))
                weighted = unweighted * p.fp
            points.append(Point(s, weighted, cur_name if i >= probation else "probationary"))
            if cur is not None and t == cur[1]:
                prev_right, prev_width, cur = i, cur_width, None
                cur_name = cur_width = cur_right = None
    scorable = sorted([x for x in points if x.window != "probationary"], key=lambda x: x.score, reverse=True)
    parts: dict[str | None, float] = {"fp": 0}
    for x in scorable:
        if x.window is not None:
            parts[x.window] = -p.fn
    out = []
    threshold = 1.1
    tn = sum(x.window is None for x in scorable)
    fn = len(scorable) - tn
    tp = fp = 0
    for x in scorable:
        if x.score != threshold:
            out.append((threshold, sum(parts.values()), tp, tn, fp, fn))
            threshold = x.score
        if x.window is not None:
            tp, fn = tp + 1, fn - 1
            parts[x.window] = max(parts[x.window], x.sweep)
        else:
            fp, tn = fp + 1, tn - 1
            parts["fp"] += x.sweep
    out.append((threshold, sum(parts.values()), tp, tn, fp, fn))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_sweep_matches_a_literal_port_of_nabs_sweeper(seed: int) -> None:
    rng = random.Random(seed)
    results: dict[str, tuple[list[datetime], list[float]]] = {}
    windows: dict[str, list[tuple[datetime, datetime]]] = {}
    for k in range(3):
        n = rng.randrange(120, 400)
        ts = stamps(n)
        # Quantised scores make ties; the first window may start inside the probationary period.
        results[f"c/{k}.csv"] = (ts, [rng.randrange(0, 40) / 40 for _ in range(n)])
        starts = sorted(rng.sample(range(5, n - 20, 15), rng.randrange(0, 4)))
        windows[f"c/{k}.csv"] = [(ts[s], ts[s + rng.randrange(2, 12)]) for s in starts]
    for profile in PROFILES.values():
        ours = sweep_thresholds(results, windows, profile)
        theirs = nab_sweep_reference(results, windows, profile)
        assert [(s.threshold, s.tp, s.tn, s.fp, s.fn) for s in ours] == [
            (t[0], t[2], t[3], t[4], t[5]) for t in theirs]
        assert [s.score for s in ours] == pytest.approx([t[1] for t in theirs], abs=1e-9)
        best = sorted(theirs, key=lambda t: t[1], reverse=True)[0]  # NAB's optimiser
        found = optimise_threshold(results, windows, profile)
        assert (found.threshold, found.score) == pytest.approx((best[0], best[1]), abs=1e-9)
        corpus = score_corpus(results, windows, profile)
        assert corpus.raw == pytest.approx(best[1], abs=1e-9)


def test_bad_windows_and_results_raise_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(NabDataError, match=r"nope.json: windows file not found"):
        load_windows(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a/x.csv": [["2014-04-01 00:00:00", "yesterday"]]}')
    with pytest.raises(NabDataError, match=r"bad.json: a/x.csv: cannot parse timestamp 'yesterday'"):
        load_windows(bad)
    with pytest.raises(NabDataError, match=r"a/x.csv: no entry in the windows file"):
        score_corpus({"a/x.csv": (TS, fire(100))}, {"b/y.csv": WINDOW}, STANDARD)
    off_grid = [(TS[40] + timedelta(minutes=1), TS[49])]
    with pytest.raises(NabDataError, match="is not a row's timestamp"):
        score_corpus({"a/x.csv": (TS, fire(100))}, {"a/x.csv": off_grid}, STANDARD)
    with pytest.raises(NabDataError, match=r"a/x.csv: row 3: anomaly score nan"):
        score_corpus({"a/x.csv": (TS[:4], [0.0, 0.0, 0.0, math.nan])}, {"a/x.csv": []}, STANDARD)


def write_results(path: Path, rows: list[str], header: str = "timestamp,value,anomaly_score,is_anomaly") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")


def test_read_results_dir_reads_scores_and_decisions_and_names_bad_rows(tmp_path: Path) -> None:
    write_results(tmp_path / "out/realTraffic/speed.csv",
                  ["2015-08-31 18:22:00,90,0.25,False", "2015-08-31 18:32:00,80,0.75,True"])
    ((name, (ts, scores, flags)),) = read_results_dir(tmp_path / "out").items()
    assert name == "realTraffic/speed.csv"
    assert ts == [datetime(2015, 8, 31, 18, 22), datetime(2015, 8, 31, 18, 32)]
    assert (scores, flags) == ([0.25, 0.75], [False, True])

    with pytest.raises(NabDataError, match="missing: results directory not found"):
        read_results_dir(tmp_path / "missing")
    write_results(tmp_path / "cols/a/x.csv", ["2015-08-31 18:22:00,90"], header="timestamp,value")
    with pytest.raises(NabDataError, match=r"cols/a/x.csv: missing column\(s\) anomaly_score, is_anomaly"):
        read_results_dir(tmp_path / "cols")
    write_results(tmp_path / "ts/a/x.csv", ["2015-08-31 18:22:00,90,0.1,0", "31/08/2015,80,0.1,0"])
    with pytest.raises(NabDataError, match=r"ts/a/x.csv:3: cannot parse timestamp '31/08/2015'"):
        read_results_dir(tmp_path / "ts")
    write_results(tmp_path / "num/a/x.csv", ["2015-08-31 18:22:00,90,high,0"])
    with pytest.raises(NabDataError, match=r"num/a/x.csv:2: column anomaly_score: cannot parse 'high'"):
        read_results_dir(tmp_path / "num")


def read_nab_file(path: Path) -> list[datetime]:
    with path.open(newline="") as handle:
        return [parse_timestamp(row["timestamp"], str(path)) for row in csv.DictReader(handle)]


def test_real_nab_corpus_with_trivial_detectors() -> None:
    windows = load_windows(shared_data("nab", "combined_windows.json"))
    data = shared_data("nab", "data")
    timestamps = {f"{p.parent.name}/{p.name}": read_nab_file(p) for p in sorted(data.glob("*/*.csv"))}
    assert len(timestamps) == len(windows) == 36
    rng = random.Random(42)
    seeded = {name: (ts, [rng.random() for _ in ts]) for name, ts in timestamps.items()}
    always = {name: (ts, [True] * len(ts)) for name, ts in timestamps.items()}
    never = {name: (ts, [False] * len(ts)) for name, ts in timestamps.items()}
    for profile in PROFILES.values():
        assert score_decisions(never, windows, profile).normalized == 0.0
        assert score_decisions(always, windows, profile).normalized < -100  # fires on every row
        started = time.perf_counter()
        scored = score_corpus(seeded, windows, profile)
        assert time.perf_counter() - started < 10
        # The optimiser can always fall back to "nothing fires" (0); random is far from perfect.
        assert 0.0 <= scored.normalized < 50.0
        assert scored.perfect == 64 * profile.tp and scored.windows == 64
        assert math.fsum(f.raw for f in scored.per_file.values()) == pytest.approx(scored.raw)
