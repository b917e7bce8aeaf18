"""Config errors name the file, the key and what was expected; the process exits 78."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llm_ops_helper.agent.config import ConfigError, load, parse

REPO = Path(__file__).resolve().parents[2]
GOOD = '[broker]\nhost = "127.0.0.1"\n'


def test_example_config_parses_with_documented_defaults() -> None:
    config = load(REPO / "systemd" / "agent.example.toml")
    assert config.broker.host == "127.0.0.1"
    assert config.telemetry.interval_s == 1.0
    assert config.telemetry.buffer_s >= 600, "at least 10 minutes of snapshots are kept"
    assert config.collector_timeout_s == pytest.approx(0.8)
    sup = config.supervisor
    assert (sup.state_dir, sup.cache_path, sup.bind_host, sup.port_range) == (
        "/var/lib/llmops-agent", Path("/var/lib/llmops-agent/artifacts"), "0.0.0.0",
        (20000, 29999))
    assert (sup.cache_max_bytes, sup.stop_grace_s, sup.liveness_failures, sup.drain_delay_s) == (
        100 << 30, 30.0, 3, 2.0)
    assert sup.stop_replicas_on_exit is False
    assert sup.advertised_host, "defaults to this host's FQDN"


@pytest.mark.parametrize(("text", "message"), [
    ("", "agent.toml: key 'broker': required key is missing"),
    ('[broker]\nport = 1883\n', "agent.toml: key 'broker.host': required key is missing"),
    (GOOD + 'port = "1883"\n', "agent.toml: key 'broker.port': expected int, got str"),
    (GOOD + "colour = 3\n", "agent.toml: key 'broker.colour': unknown key"),
    (GOOD + "[telemetry]\ninterval_s = 0\n", "agent.toml: key 'telemetry.interval_s': expected float >= 0.05"),
    (GOOD + '[gpus]\nbackend = "cuda"\n', "agent.toml: key 'gpus.backend': 'cuda' is not one of 'auto', 'nvml', 'simulated', 'none'"),
    (GOOD + '[[replicas]]\nname = "a"\nruntime = "vllm"\n', "agent.toml: key 'replicas[0].metrics_url': required key is missing"),
    (GOOD + '[[replicas]]\nname = "a"\nruntime = "vllm"\nmetrics_url = "localhost:8000"\n', "agent.toml: key 'replicas[0].metrics_url': expected an http(s) URL"),
    ('host = "gpu/01"\n' + GOOD, "agent.toml: key 'host': host name 'gpu/01' is not usable"),
    (GOOD + "[telemetry]\nbuffer_s = 0.1\n", "agent.toml: key 'telemetry.buffer_s': expected at least one interval"),
    ("[broker\n", "agent.toml: not valid TOML"),
    (GOOD + "[supervisor]\nport_range = [30000, 20000]\n", "agent.toml: key 'supervisor.port_range': expected [low, high] with low <= high"),
    (GOOD + "[supervisor]\nport_range = [0, 20000]\n", "agent.toml: key 'supervisor.port_range[0]': expected int >= 1"),
    (GOOD + '[supervisor]\nstate_dir = "state"\n', "agent.toml: key 'supervisor.state_dir': expected an absolute path"),
    (GOOD + "[supervisor]\nrestart_backoff_max_s = 0.5\n", "agent.toml: key 'supervisor.restart_backoff_max_s': expected a value >= supervisor.restart_backoff_min_s"),
    (GOOD + "[supervisor]\nliveness_failures = 0\n", "agent.toml: key 'supervisor.liveness_failures': expected int >= 1"),
    (GOOD + "[supervisor]\nstop_on_exit = true\n", "agent.toml: key 'supervisor.stop_on_exit': unknown key"),
])
def test_bad_config_names_file_key_and_expectation(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, "agent.toml")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_missing_scenario_and_secret_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'gpus.scenario': no such file 'nope.toml'"):
        parse(GOOD + '[gpus]\nscenario = "nope.toml"\n', str(tmp_path / "agent.toml"))
    config = parse(GOOD, str(tmp_path / "agent.toml"))
    with pytest.raises(ConfigError, match=r"key 'commands.keys\[0\].file': cannot read secret"):
        config.read_secret("missing.key", "commands.keys[0].file")


@pytest.mark.parametrize(("text", "key"), [
    (GOOD + "[telemetry]\ninterval_s = \"fast\"\n", "telemetry.interval_s"),
    (GOOD + "[gpu]\nbackend = \"auto\"\n", "gpu"),
    ("[telemetry]\ninterval_s = 1.0\n", "broker"),
])
def test_agent_process_exits_78_with_one_line(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "llm_ops_helper.agent", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 78
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(path) in lines[0] and f"key '{key}'" in lines[0]
    assert done.stdout == ""


def test_unreadable_config_file_exits_78(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "llm_ops_helper.agent", "--config",
                           str(tmp_path / "absent.toml")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 78
    assert "absent.toml: cannot read config file: No such file or directory" in done.stderr
