"""`llmops eval`: NAB scoring from a results folder, the anomaly runner glue, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from llm_ops_helper.cli import main
from tests.conftest import shared_data

T0 = datetime(2014, 4, 1)


def write_corpus(root: Path) -> tuple[Path, Path]:
    """One 100-row results file: a window over rows 40-49, caught at row 40 and a far FP at 90."""
    results = root / "out"
    (results / "cat").mkdir(parents=True)
    rows = ["timestamp,value,anomaly_score,is_anomaly"]
    for i in range(100):
        score = {40: 0.9, 90: 0.8, 45: 0.6}.get(i, 0.1)
        rows.append(f"{T0 + timedelta(minutes=5 * i)},{i},{score},{i in (40, 90)}")
    (results / "cat" / "x.csv").write_text("\n".join(rows) + "\n")
    windows = root / "windows.json"
    windows.write_text(json.dumps(
        {"cat/x.csv": [[f"{T0 + timedelta(minutes=200)}.000000", f"{T0 + timedelta(minutes=245)}"]]}))
    return results, windows


def test_nab_score_prints_and_writes_both_scores_per_profile(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results, windows = write_corpus(tmp_path)
    out_json = tmp_path / "scores.json"
    assert main(["eval", "nab-score", "--results", str(results), "--windows", str(windows),
                 "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "1 files, 100 rows" in printed
    report = json.loads(out_json.read_text())
    assert set(report["profiles"]) == {"standard", "reward_low_FP_rate", "reward_low_FN_rate"}
    standard = report["profiles"]["standard"]
    # is_anomaly fires at 40 (first row: +1) and 90 (far FP: -0.11); null -1, perfect 1.
    assert standard["is_anomaly"]["normalized"] == pytest.approx(100 * (0.89 + 1) / 2)
    assert standard["is_anomaly"]["threshold"] == 0.5
    # NAB's optimiser stops at 0.9: the window's first row, without the FP at 0.8.
    assert standard["optimized"]["threshold"] == 0.9
    assert standard["optimized"]["normalized"] == pytest.approx(100.0)
    assert (standard["optimized"]["tp"], standard["optimized"]["fp"],
            standard["optimized"]["windows_detected"]) == (1, 0, 1)
    lines = [line.split() for line in printed.splitlines()]
    assert ["standard", "is_anomaly", "94.50", "0.5", "1", "1", "9", "1/1"] in lines
    assert ["standard", "NAB-optimal", "100.00", "0.9", "1", "0", "9", "1/1"] in lines


def test_nab_score_one_profile_through_the_installed_command(tmp_path: Path) -> None:
    results, windows = write_corpus(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "llm_ops_helper.cli", "eval", "nab-score", "--results",
         str(results), "--windows", str(windows), "--profile", "reward_low_FN_rate"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "reward_low_FN_rate" in done.stdout and "standard " not in done.stdout


@pytest.mark.parametrize(("case", "expected"), [
    ("no-results", "nowhere: results directory not found"),
    ("no-windows", "missing.json: windows file not found"),
    ("no-entry", "cat/y.csv: no entry in the windows file"),
    ("bad-column", "cat/x.csv: missing column(s) anomaly_score"),
])
def test_nab_score_bad_input_exits_2_naming_the_path(tmp_path: Path, case: str, expected: str) -> None:
    results, windows = write_corpus(tmp_path)
    if case == "no-results":
        results = tmp_path / "nowhere"
    elif case == "no-windows":
        windows = tmp_path / "missing.json"
    elif case == "no-entry":
        shutil.copy(results / "cat" / "x.csv", results / "cat" / "y.csv")
    else:
        (results / "cat" / "x.csv").write_text("timestamp,value\n2014-04-01 00:00:00,1\n")
    done = subprocess.run(
        [sys.executable, "-m", "llm_ops_helper.cli", "eval", "nab-score", "--results",
         str(results), "--windows", str(windows)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert expected in done.stderr and "Traceback" not in done.stderr


def test_eval_anomaly_missing_data_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "anomaly", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "none: data directory not found" in capsys.readouterr().err


def test_eval_anomaly_runs_the_detector_and_prints_its_cost(tmp_path: Path) -> None:
    pytest.importorskip("llm_ops_helper.controller.evaluation.run_anomaly")
    source = shared_data("nab", "data", "realAWSCloudwatch", "ec2_cpu_utilization_5f5533.csv")
    (tmp_path / "data" / "realAWSCloudwatch").mkdir(parents=True)
    shutil.copy(source, tmp_path / "data" / "realAWSCloudwatch" / source.name)
    done = subprocess.run(
        [sys.executable, "-m", "llm_ops_helper.cli", "eval", "anomaly", "--data",
         str(tmp_path / "data"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 files" in done.stdout and "µs per sample" in done.stdout
    assert (tmp_path / "out" / "realAWSCloudwatch" / source.name).is_file()


def test_the_command_line_loads_numpy_and_river_only_for_eval() -> None:
    code = ("import sys, llm_ops_helper.cli, llm_ops_helper.evaluate\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('river', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def write_trace(path: Path, rows: int = 240) -> Path:
    """Requests every second for `rows` seconds, a burst of 20 in the middle minute."""
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(rows):
        t = datetime(2023, 11, 16, 18) + timedelta(seconds=i, microseconds=123)
        lines.append(f"{t.isoformat(sep=' ')}0,{400 if 100 <= i < 160 else 40},10")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("policy", ["predictive", "reactive", "hpa"])
def test_eval_autoscale_writes_one_row_per_bin_and_a_summary(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str) -> None:
    trace, out = write_trace(tmp_path / "trace.csv"), tmp_path / "decisions.csv"
    assert main(["eval", "autoscale", "--trace", str(trace), "--bin", "10", "--capacity", "100",
                 "--cold-start", "30", "--policy", policy, "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("t,load_tokens,desired_replicas,")
    assert len(lines) == 1 + 24
    assert lines[1].split(",")[:3] == ["0", "500", "1"]
    assert [line.split(",")[1] for line in lines[11:13]] == ["4100", "4100"]
    printed = capsys.readouterr().out
    assert printed.startswith(f"{policy}: 24 bins of 10 s: too few active replicas in ")
    assert "billed" in printed and str(out) in printed


def test_eval_autoscale_hpa_options_change_the_decisions(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "trace.csv")
    counts = []
    for window in ("0", "120"):
        out = tmp_path / f"{window}.csv"
        assert main(["eval", "autoscale", "--trace", str(trace), "--bin", "10", "--capacity",
                     "100", "--policy", "hpa", "--window", window, "--target-utilization", "1",
                     "--out", str(out)]) == 0
        counts.append(sum(int(r.split(",")[2]) for r in out.read_text().splitlines()[1:]))
    assert counts[1] > counts[0]


@pytest.mark.parametrize(("content", "message"), [
    ("", "trace.csv:1: empty file"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:01,1,1\n2023-11-16 18:00:00,1,1\n",
     "trace.csv:3: timestamps not sorted"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:01,1,1\nnot a time,1,1\n",
     "trace.csv:3: TIMESTAMP 'not a time' is not a timestamp"),
])
def test_eval_autoscale_bad_trace_is_one_line_with_the_line_number(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(content)
    assert main(["eval", "autoscale", "--trace", str(trace), "--capacity", "100",
                 "--out", str(tmp_path / "d.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmops eval: error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "d.csv").exists()


def test_eval_autoscale_rejects_bad_numbers(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "trace.csv")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "autoscale", "--trace", str(trace), "--capacity", "0", "--out", "d.csv"])
    assert exc.value.code == 2
    assert "must be > 0" in capsys.readouterr().err
    assert main(["eval", "autoscale", "--trace", str(trace), "--capacity", "1",
                 "--min-replicas", "3", "--max-replicas", "2", "--out", "d.csv"]) == 2
