"""Scenario files: typed entries, and errors that name the file, the entry and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_ops_helper.agent.collectors.scenario import (
    KINDS,
    Disappear,
    Ecc,
    Scenario,
    ScenarioError,
    TemperatureRamp,
    Throttle,
    Utilization,
    Xid,
    load_scenario,
    parse_scenario,
)

EXAMPLE = Path(__file__).parents[2] / "systemd" / "scenario.example.toml"


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(body)
    return path


def test_a_file_becomes_frozen_typed_entries(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, """
description = "one of each"

[[events]]
at_s = 5
gpu = 3
kind = "xid"
xid = 79

[[events]]
at_s = 1.5
kind = "utilization"
pattern = "square"
level_pct = 80
period_s = 10
for_s = 30

[[events]]
at_s = 2
gpu = 0
kind = "temperature_ramp"
to_c = 90
over_s = 20
"""))
    xid, util, ramp = scenario.events
    assert xid == Xid(at_s=5.0, gpu=3, xid=79)
    assert util == Utilization(at_s=1.5, pattern="square", level_pct=80.0, period_s=10.0,
                               for_s=30.0)
    assert util.gpu is None
    assert util.applies_to(0)
    assert util.applies_to(7)
    assert xid.applies_to(3)
    assert not xid.applies_to(2)
    assert ramp == TemperatureRamp(at_s=2.0, gpu=0, to_c=90.0, over_s=20.0)
    assert scenario.description == "one of each"
    assert scenario.source.endswith("scenario.toml")
    with pytest.raises(AttributeError):
        xid.xid = 13  # type: ignore[misc]


def test_windows_hold_from_at_s_for_for_s() -> None:
    gone = Disappear(at_s=10, gpu=1, for_s=5)
    assert [gone.active(t) for t in (9.9, 10, 14.9, 15)] == [False, True, True, False]
    assert Disappear(at_s=10, gpu=1).active(1e9)


def test_an_empty_file_is_an_empty_scenario() -> None:
    assert parse_scenario("").events == ()


@pytest.mark.parametrize(("entry", "message"), [
    ('kind = "xid"\nxid = "79"', "scenario.toml: events[1].xid: expected int, got str"),
    ('kind = "xid"\nxid = 79\ncolour = "red"',
     "scenario.toml: events[1].colour: unknown key (allowed: kind, at_s, gpu, xid)"),
    ('kind = "meltdown"', "scenario.toml: events[1].kind: unknown kind 'meltdown' (expected "
     "one of: disappear, ecc, pcie_replay, power, temperature_ramp, throttle, utilization, xid)"),
    ('kind = "xid"', "scenario.toml: events[1].xid: missing required key"),
    ("xid = 79", "scenario.toml: events[1].kind: missing required key"),
    ('kind = "xid"\nxid = 79\ngpu = -1', "scenario.toml: events[1].gpu: expected int >= 0"),
    ('kind = "utilization"\npattern = "zigzag"', "scenario.toml: events[1].pattern: unknown "
     "pattern 'zigzag' (expected one of: constant, sine, square, idle)"),
    ('kind = "utilization"\nlevel_pct = 150', "events[1].level_pct: expected float <= 100"),
    ('kind = "throttle"\nreasons = ["gpu_idle", "too_hot"]',
     "scenario.toml: events[1].reasons[1]: unknown throttle reason 'too_hot' (expected one of: "
     "gpu_idle, "),
    ('kind = "ecc"\nuncorrected = true', "events[1].uncorrected: expected int, got bool"),
])
def test_a_bad_entry_is_named_with_its_key_and_what_was_expected(
        tmp_path: Path, entry: str, message: str) -> None:
    good = '[[events]]\nat_s = 0\nkind = "xid"\nxid = 13\n'
    path = write(tmp_path, f"{good}\n[[events]]\nat_s = 5\n{entry}\n")
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    assert str(caught.value).startswith(str(path.parent) + "/")
    assert message in str(caught.value)


def test_a_missing_at_s_and_a_negative_one_are_refused() -> None:
    with pytest.raises(ScenarioError, match=r"^s\.toml: events\[0\]\.at_s: missing required key$"):
        parse_scenario('[[events]]\nkind = "xid"\nxid = 1', "s.toml")
    with pytest.raises(ScenarioError, match=r"events\[0\]\.at_s: expected float >= 0\.0"):
        parse_scenario('[[events]]\nat_s = -1\nkind = "xid"\nxid = 1', "s.toml")


def test_file_level_problems(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"^s\.toml: evnts: unknown key \(allowed: "
                                            r"description, events\)$"):
        parse_scenario("[[evnts]]\nat_s = 1", "s.toml")
    with pytest.raises(ScenarioError, match=r"^s\.toml: events: expected array, got object$"):
        parse_scenario("[events]\nat_s = 1", "s.toml")
    with pytest.raises(ScenarioError, match=r"^s\.toml: not valid TOML: "):
        parse_scenario("[[events]\nat_s = 1", "s.toml")
    missing = tmp_path / "nope.toml"
    with pytest.raises(ScenarioError, match=rf"^{missing}: cannot read: No such file"):
        load_scenario(missing)


def test_entries_for_gpus_the_host_lacks_are_refused() -> None:
    scenario = parse_scenario('[[events]]\nat_s = 1\ngpu = 8\nkind = "xid"\nxid = 79', "s.toml")
    scenario.check_gpus(9)
    with pytest.raises(ScenarioError, match=r"^s\.toml: events\[0\]\.gpu: GPU 8 does not exist "
                                            r"\(the host has 8: 0\.\.7\)$"):
        scenario.check_gpus(8)


def test_the_example_file_parses_and_shows_every_kind() -> None:
    scenario = load_scenario(EXAMPLE)
    assert isinstance(scenario, Scenario)
    assert {type(e) for e in scenario.events} == set(KINDS.values())
    assert any(isinstance(e, Xid) and e.xid == 79 for e in scenario.events)
    assert any(isinstance(e, Ecc) and e.uncorrected for e in scenario.events)
    assert any(isinstance(e, Throttle) for e in scenario.events)
    scenario.check_gpus(8)
