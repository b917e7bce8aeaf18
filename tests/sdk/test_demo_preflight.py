"""``llmops demo`` before it starts anything: Mosquitto missing, ports taken, the generated
scenario and the load profile, the narration's lines."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import psutil
import pytest

from llm_ops_helper import cli, demoprep
from llm_ops_helper.agent.collectors.scenario import Xid, parse_scenario
from llm_ops_helper.broker import BrokerUnavailable
from llm_ops_helper.demoload import BASE_RPS, PEAK_RPS, phase_at, rate_at
from llm_ops_helper.demowatch import decision_line
from llm_ops_helper.localfleet import pick_port


def _no_mosquitto() -> str:
    raise BrokerUnavailable("mosquitto is not installed")


def test_without_mosquitto_and_without_root_it_names_the_command_and_starts_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demoprep, "mosquitto_binary", _no_mosquitto)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    code = cli.main(["demo", "--duration", "5", "--workdir", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert code == demoprep.EX_UNAVAILABLE
    assert "    sudo apt-get install -y mosquitto\n" in err
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    assert not (tmp_path / "demo").exists()


def test_as_root_without_apt_it_names_the_root_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demoprep, "mosquitto_binary", _no_mosquitto)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    which = shutil.which
    monkeypatch.setattr(shutil, "which",
                        lambda name, *a, **k: None if name == "apt-get" else which(name))
    with pytest.raises(demoprep.PreflightError) as caught:
        demoprep.find_mosquitto()
    assert str(caught.value).endswith("\n    apt-get install -y mosquitto")


def test_a_taken_port_is_replaced_by_a_free_one() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        other = pick_port(taken)
        assert other != taken
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", other))  # it was free
    assert pick_port(other) == other


def test_the_fault_scenario_is_valid_and_faults_one_gpu_once() -> None:
    faulty = parse_scenario(demoprep.scenario_text(2, fault=True, period_s=60))
    faulty.check_gpus(2)
    xids = [e for e in faulty.events if isinstance(e, Xid)]
    assert [(e.xid, e.gpu, e.at_s) for e in xids] == [(79, 1, demoprep.FAULT_AT_S)]
    quiet = parse_scenario(demoprep.scenario_text(1, fault=False, period_s=75))
    assert not [e for e in quiet.events if isinstance(e, Xid)]
    parse_scenario(demoprep.scenario_text(1, fault=True, period_s=60)).check_gpus(1)


def test_the_load_rises_to_the_peak_and_falls_back_within_each_cycle() -> None:
    span = 50.0
    rates = [rate_at(t / 10, span) for t in range(int(span * 10))]
    peak_at = rates.index(max(rates))
    assert rates[0] == BASE_RPS and max(rates) == PEAK_RPS and rates[-1] == BASE_RPS
    assert rates[:peak_at + 1] == sorted(rates[:peak_at + 1])
    assert rates[peak_at:] == sorted(rates[peak_at:], reverse=True)
    assert [phase_at(t, span) for t in (0, 10, 18, 25, 40)] == \
        ["trickle", "rising", "peak", "falling", "trickle"]
    assert rate_at(span + 18, span) == rate_at(18, span)  # cycles when the demo runs on


def test_only_applied_changes_become_scaling_lines() -> None:
    base = {"applied": True, "current": 1, "desired": 2, "rule": "reactive", "reason": "why"}
    assert decision_line(base) == "scaled up   1 -> 2 replicas (rule reactive): why"
    assert (decision_line({**base, "current": 3}) or "").startswith("scaled down")
    assert decision_line({**base, "applied": False}) is None
    assert decision_line({**base, "current": 2}) is None
