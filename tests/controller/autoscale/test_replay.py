"""Replay: trace parsing and its errors, virtual time, cold starts, only-past decisions, scores."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_ops_helper.controller.autoscale.replay import (
    Oracle,
    Row,
    Setup,
    TraceError,
    bin_loads,
    read_trace,
    replay,
    stepper_for,
    summarize,
    write_csv,
)

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def trace_file(tmp_path: Path, *lines: str, header: str = HEADER) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text("\n".join([header, *lines]) + "\n" if header else "\n".join(lines))
    return path


class Scripted:
    """Wants the replicas of a script; records what it had seen at each decision."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.seen, self.observed = script, [], []  # type: ignore[var-annotated]
        self.asked: list[tuple[float, int, int]] = []

    def observe(self, load_tokens: float) -> None:
        self.observed.append(load_tokens)

    def decide(self, now: float, current: int, ready: int) -> tuple[int, str]:
        self.seen.append(list(self.observed))
        self.asked.append((now, current, ready))
        return self.script[len(self.asked) - 1], "script"


def test_reads_the_azure_format(tmp_path: Path) -> None:
    path = trace_file(tmp_path, "2023-11-16 18:17:03.9799600,4808,10",
                      "2023-11-16 18:17:04.0319600,3180,8", "",
                      "2023-11-16 18:17:09.9799600,100,0")
    t = read_trace(path)
    assert t.tokens == [4818, 3188, 100]
    assert t.times == pytest.approx([0.0, 0.052, 6.0])
    assert bin_loads(t, 5.0) == [8006.0, 100.0]
    assert bin_loads(t, 1.0) == [8006.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0]


def test_reads_the_real_trace() -> None:
    from tests.conftest import shared_data

    t = read_trace(shared_data("azure-llm") / "AzureLLMInferenceTrace_code.csv")
    assert len(t.times) == 8819
    assert 3400 < t.times[-1] < 3600


@pytest.mark.parametrize(("lines", "header", "message"), [
    ((), "", r"trace.csv:1: empty file; expected a header TIMESTAMP,ContextTokens,GeneratedTokens"),
    ((), HEADER, r"trace.csv:1: no requests after the header"),
    (("2023-11-16 18:17:03,1,2",), "TIMESTAMP,ContextTokens", r"trace.csv:1: header lacks GeneratedTokens"),
    (("2023-11-16 18:17:03,1,2", "yesterday,1,2"), HEADER, r"trace.csv:3: TIMESTAMP 'yesterday' is not a timestamp"),
    (("2023-11-16 18:17:03.12x,1,2",), HEADER, r"trace.csv:2: TIMESTAMP"),
    (("2023-11-16 18:17:03,1,2", "2023-11-16 18:17:04,many,2"), HEADER, r"trace.csv:3: ContextTokens 'many' and GeneratedTokens '2' must be whole"),
    (("2023-11-16 18:17:03,1,-2",), HEADER, r"trace.csv:2: ContextTokens"),
    (("2023-11-16 18:17:03,1",), HEADER, r"trace.csv:2: 2 fields, expected 3"),
    (("2023-11-16 18:17:05,1,2", "2023-11-16 18:17:06,1,2", "2023-11-16 18:17:04.5,1,2"), HEADER,
     r"trace.csv:4: timestamps not sorted: 2023-11-16 18:17:04.5 is earlier than the line before"),
])
def test_bad_traces_name_the_line(tmp_path: Path, lines: tuple[str, ...], header: str,
                                  message: str) -> None:
    with pytest.raises(TraceError, match=message):
        read_trace(trace_file(tmp_path, *lines, header=header))


def test_missing_trace(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read the trace"):
        read_trace(tmp_path / "nope.csv")


def test_cold_start_activation_and_immediate_scale_down() -> None:
    # 10 s bins, 20 s cold start, 100 tokens/s per replica: 1,000 tokens per replica-bin.
    setup = Setup(bin_s=10.0, capacity_tokens_per_s=100.0, cold_start_s=20.0)
    loads = [500.0, 2500.0, 2500.0, 2500.0, 2500.0, 500.0, 500.0, 3000.0]
    script = [1, 3, 3, 3, 3, 1, 4, 1]
    stepper = Scripted(script)
    rows = replay(loads, stepper, setup)
    assert [r.desired_replicas for r in rows] == script
    # Two asked for at t=10 serve from t=30; the one asked at t=60 never does.
    assert [r.active_replicas for r in rows] == [1, 1, 1, 3, 3, 1, 1, 1]
    assert [r.short for r in rows] == [False, True, True, False, False, False, False, True]
    # What the policy was told: requested and ready counts at each bin start.
    assert stepper.asked == [(0.0, 1, 1), (10.0, 1, 1), (20.0, 3, 1), (30.0, 3, 3), (40.0, 3, 3),
                             (50.0, 3, 3), (60.0, 1, 1), (70.0, 4, 1)]
    s = summarize(rows, setup)
    assert (s.bins, s.short_bins) == (8, 3)
    assert s.billed_replica_s == 10.0 * sum(script)
    assert s.active_replica_s == 10.0 * 12
    assert s.ideal_replica_s == 10.0 * (1 + 3 + 3 + 3 + 3 + 1 + 1 + 3)
    assert s.short_fraction == 3 / 8
    assert s.billed_vs_ideal == pytest.approx(19 / 18)
    assert "too few active replicas in 3 bins (30 s, 37.5% of the time)" in s.text()


def test_scale_down_drops_starting_replicas_first() -> None:
    setup = Setup(bin_s=10.0, capacity_tokens_per_s=100.0, cold_start_s=30.0)
    rows = replay([0.0] * 6, Scripted([3, 3, 3, 5, 2, 2]), setup)
    # 2 asked at t=0 are active from t=30; asking 2 more at t=30 then dropping to 2 keeps the
    # 2 active ones (plus the min one's slot), never a starting one.
    assert [(r.desired_replicas, r.active_replicas) for r in rows] == [
        (3, 1), (3, 1), (3, 1), (5, 3), (2, 2), (2, 2)]


def test_decisions_see_only_past_bins() -> None:
    setup = Setup(bin_s=5.0, capacity_tokens_per_s=10.0, cold_start_s=10.0)
    loads = [float(k * 7 % 11) for k in range(12)]
    stepper = Scripted([1] * 12)
    replay(loads, stepper, setup)
    assert stepper.seen == [loads[:k] for k in range(12)]


@pytest.mark.parametrize("policy", ["predictive", "reactive", "hpa"])
def test_a_bins_load_never_changes_its_own_decision(policy: str) -> None:
    setup = Setup(bin_s=5.0, capacity_tokens_per_s=100.0, cold_start_s=20.0)
    loads = [float((k * 37) % 900) for k in range(200)]
    base = replay(loads, stepper_for(policy, setup), setup)
    bumped = [*loads[:120], 50_000.0, *loads[121:]]
    after = replay(bumped, stepper_for(policy, setup), setup)
    assert [r.desired_replicas for r in after[:121]] == [r.desired_replicas for r in base[:121]]
    assert after[121].desired_replicas > base[121].desired_replicas


def test_replay_is_deterministic_and_predictive_uses_forecasts() -> None:
    setup = Setup(bin_s=5.0, capacity_tokens_per_s=100.0, cold_start_s=20.0)
    loads = [float((k * 37) % 900) for k in range(300)]
    a = replay(loads, stepper_for("predictive", setup), setup)
    b = replay(loads, stepper_for("predictive", setup), setup)
    assert a == b
    assert {r.rule for r in a} >= {"no_metrics", "forecast"}


def test_hpa_holds_while_reactive_follows() -> None:
    setup = Setup(bin_s=10.0, capacity_tokens_per_s=100.0, cold_start_s=0.0)
    loads = [3000.0, 0.0, 0.0, 0.0, 0.0]
    reactive = replay(loads, stepper_for("reactive", setup), setup)
    hpa = replay(loads, stepper_for("hpa", setup, window_s=30.0, target_utilization=1.0), setup)
    assert [r.desired_replicas for r in reactive] == [1, 3, 1, 1, 1]
    assert [r.desired_replicas for r in hpa] == [1, 3, 3, 3, 1]


def test_oracle_is_never_short_when_the_start_allows() -> None:
    setup = Setup(bin_s=5.0, capacity_tokens_per_s=100.0, cold_start_s=15.0)
    loads = [0.0, 0.0, 0.0, 0.0, 1200.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 900.0, 0.0]
    rows = replay(loads, Oracle(loads, setup), setup)
    assert not any(r.short for r in rows)
    # Asked for one cold start (3 bins) ahead; a gap longer than a cold start is released.
    assert [r.desired_replicas for r in rows] == [1, 3, 3, 3, 3, 1, 1, 1, 1, 2, 2, 2, 2, 1]


def test_csv_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    write_csv([Row(0.0, 10.0, 1, 1, False, "x"), Row(5.0, 2.5, 2, 1, True, "y")], path)
    assert path.read_text().splitlines() == [
        "t,load_tokens,desired_replicas,active_replicas,short,rule", "0,10,1,1,0,x",
        "5,2.5,2,1,1,y"]


def test_the_cli_default_is_the_policy_the_bench_chose_and_reported() -> None:
    import json

    from tests.conftest import shared_data

    results = json.loads((Path(__file__).parents[3] / "bench" / "results" /
                          "autoscale.json").read_text())
    chosen = results["verdict"]["predictive_setting_chosen_on_first_half"]
    assert chosen == {"forecaster": "moving_average_300s", "quantile": 0.9,
                      "target_utilization": 0.5, "window_s": 0.0}
    loads = bin_loads(read_trace(shared_data("azure-llm") / "AzureLLMInferenceTrace_code.csv"), 5.0)
    setup = Setup(5.0, results["setup"]["capacity_tokens_per_s"], 60.0)
    rows = replay(loads, stepper_for("predictive", setup), setup)
    held = summarize(rows[results["setup"]["held_out_from_bin"]:], setup)
    assert held.short_fraction == pytest.approx(results["verdict"]["predictive_held_out"]["short"], abs=1e-4)
    assert held.billed_replica_s == results["verdict"]["predictive_held_out"]["billed_s"]
