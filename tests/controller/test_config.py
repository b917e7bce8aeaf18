from __future__ import annotations

from pathlib import Path

import pytest

from llm_ops_helper.broker import make_pki
from llm_ops_helper.controller.config import ConfigError, load, parse

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "controller.example.toml"


def test_the_shipped_example_is_valid_and_shows_the_defaults() -> None:
    config = load(EXAMPLE)
    defaults = parse('[broker]\nhost = "127.0.0.1"\n', "x.toml")
    assert config.broker == defaults.broker and config.rules == defaults.rules
    assert config.fleet == defaults.fleet and config.detection == defaults.detection
    assert 79 in config.rules.critical_xids and 13 not in config.rules.critical_xids
    assert config.commands == defaults.commands and config.deployments == defaults.deployments
    assert config.registry == defaults.registry and config.http == defaults.http


@pytest.mark.parametrize(("text", "message"), [
    ("", "c.toml: key 'broker': required key is missing"),
    ('[broker]\nhost = "h"\nport = "x"', "c.toml: key 'broker.port': expected int, got str"),
    ('[broker]\nhost = "h"\n[rules]\ntemp = 1', "c.toml: key 'rules.temp': unknown key"),
    ('log_level = "loud"\n[broker]\nhost = "h"', "c.toml: key 'log_level': 'loud' is not one of"),
    ('[broker]\nhost = "h"\n[[alerts.webhooks]]\nurl = "ftp://x"',
     "c.toml: key 'alerts.webhooks[0].url': expected an http(s) URL, got 'ftp://x'"),
    ('[broker]\nhost = "h"\nreconnect_min_s = 5\nreconnect_max_s = 1',
     "c.toml: key 'broker.reconnect_max_s': expected a value >= broker.reconnect_min_s"),
    ("[broker", "c.toml: not valid TOML"),
    ('[broker]\nhost = "h"\n[http]\nadvertise_url = "head:8470"',
     "c.toml: key 'http.advertise_url': expected an http(s) URL, got 'head:8470'"),
    ('[broker]\nhost = "h"\n[commands]\nkey_file = "nope.key"',
     "c.toml: key 'commands.key_file': cannot read secret file 'nope.key'"),
    ('[broker]\nhost = "h"\n[commands]\nkeys_dir = "nope"',
     "c.toml: key 'commands.keys_dir': no such directory 'nope'"),
    ('[broker]\nhost = "h"\n[commands]\nttl_s = 1',
     "c.toml: key 'commands.ttl_s': expected float >= 5"),
])
def test_a_bad_file_names_the_key_and_what_was_expected(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, "c.toml")
    assert str(caught.value).startswith(message), str(caught.value)


def test_password_comes_from_its_own_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    config = parse('[broker]\nhost = "h"\npassword_file = "pw"\n', str(tmp_path / "c.toml"))
    assert config.broker_password() == "s3cret"
    missing = parse('[broker]\nhost = "h"\npassword_file = "nope"\n', str(tmp_path / "c.toml"))
    with pytest.raises(ConfigError, match=r"key 'broker\.password_file': cannot read secret"):
        missing.broker_password()


def test_a_host_key_file_overrides_the_fleet_key(tmp_path: Path) -> None:
    (tmp_path / "fleet.key").write_text("fleet-secret\n")
    (tmp_path / "hosts").mkdir()
    (tmp_path / "hosts" / "gpu-07.key").write_text("own-secret")
    config = parse('[broker]\nhost = "h"\n[commands]\nkey_file = "fleet.key"\n'
                   'keys_dir = "hosts"\n', str(tmp_path / "c.toml"))
    assert config.command_secret("gpu-07") == b"own-secret"
    assert config.command_secret("gpu-01") == b"fleet-secret"
    assert parse('[broker]\nhost = "h"\n', "c.toml").command_secret("gpu-01") is None


def test_tls_to_the_broker_with_a_ca_relative_to_the_config(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    path = tmp_path / "controller.toml"
    path.write_text('[broker]\nhost = "mqtt.example"\nport = 8883\ntls = true\n'
                    'ca_file = "pki/ca.crt"\nusername = "llmops-controller"\n')
    broker = load(path).broker
    assert (broker.tls, broker.ca_file, broker.tls_insecure) == (True, str(pki.ca), False)
    with pytest.raises(ConfigError, match=r"c\.toml: key 'broker\.ca_file': cannot read 'x\.crt'"):
        parse('[broker]\nhost = "h"\ntls = true\nca_file = "x.crt"\n', "c.toml")
    with pytest.raises(ConfigError, match=r"c\.toml: key 'broker\.key_file': set, but broker\.tls"):
        parse(f'[broker]\nhost = "h"\nkey_file = "{pki.client_key}"\n', "c.toml")
