"""Config errors name the file, the key and what was expected; the process exits 78."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llm_ops_helper.agent.config import ConfigError, load, parse
from llm_ops_helper.broker import Pki, make_pki

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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_files_resolve_against_the_config_directory(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "tls").mkdir()
    for source in (pki.ca, pki.client_cert, pki.client_key):
        (tmp_path / "tls" / source.name).write_bytes(source.read_bytes())
    path = tmp_path / "agent.toml"
    path.write_text('host = "gpu-a"\n[broker]\nhost = "mqtt.example"\nport = 8883\n'
                    'tls = true\nca_file = "tls/ca.crt"\ncert_file = "tls/client.crt"\n'
                    'key_file = "tls/client.key"\nusername = "gpu-a"\n')
    broker = load(path).broker
    assert (broker.tls, broker.tls_insecure, broker.username) == (True, False, "gpu-a")
    assert (broker.ca_file, broker.cert_file, broker.key_file) == tuple(
        str(tmp_path / "tls" / name) for name in ("ca.crt", "client.crt", "client.key"))


def test_tls_is_off_and_verified_by_default() -> None:
    broker = parse(GOOD, "agent.toml").broker
    assert (broker.tls, broker.tls_insecure, broker.ca_file) == (False, False, "")


@pytest.mark.parametrize(("keys", "message"), [
    ('tls = true\nca_file = "{missing}"',
     "key 'broker.ca_file': cannot read '{missing}': No such file or directory"),
    ('tls = true\nca_file = "{garbage}"', "key 'broker.ca_file': cannot load CA certificates"),
    ('tls = true\nca_file = "{ca}"\ncert_file = "{cert}"',
     "key 'broker.key_file': a client certificate needs both"),
    ('tls = true\nca_file = "{ca}"\ncert_file = "{cert}"\nkey_file = "{wrong_key}"',
     "key 'broker.cert_file': cannot load client certificate"),
    ('ca_file = "{ca}"', "key 'broker.ca_file': set, but broker.tls is false"),
    ("tls_insecure = true", "key 'broker.tls_insecure': set, but broker.tls is false"),
])
def test_bad_tls_settings_name_the_key(tmp_path: Path, pki: Pki, keys: str,
                                       message: str) -> None:
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    paths = {"missing": str(tmp_path / "nope.crt"), "garbage": str(garbage),
             "ca": str(pki.ca), "cert": str(pki.client_cert), "wrong_key": str(pki.server_key)}
    with pytest.raises(ConfigError) as err:
        parse(GOOD + keys.format(**paths) + "\n", "agent.toml")
    assert str(err.value).startswith("agent.toml: " + message.format(**paths)), str(err.value)


def test_broker_username_must_be_the_host_name_for_the_acl() -> None:
    assert parse('host = "gpu-a"\n' + GOOD + 'username = "gpu-a"\n', "a.toml").broker.username
    with pytest.raises(ConfigError, match=r"key 'broker.username': expected the agent's host "
                                          r"name 'gpu-a' .*got 'gpu-b'"):
        parse('host = "gpu-a"\n' + GOOD + 'username = "gpu-b"\n', "a.toml")
