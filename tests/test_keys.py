"""The command-key store on disk, `llmops keys`, and what the controller signs with."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from llm_ops_helper.cli import main
from llm_ops_helper.controller.config import parse as parse_controller
from llm_ops_helper.keys import KeyFiles, KeyStore, KeyStoreError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_writes_one_0600_key_of_32_random_bytes_in_hex_and_makes_it_current(
        tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    assert store.create("gpu-01") == "k1"
    path = tmp_path / "keys" / "gpu-01" / "k1.key"
    text = path.read_text().strip()
    assert len(text) == 64 and bytes.fromhex(text)
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert store.current("gpu-01") == "k1"
    assert store.signing_key("gpu-01") == ("k1", text.encode())
    assert store.create("gpu-02")[:1] == "k"
    assert (tmp_path / "keys" / "gpu-02" / "k1.key").read_text() != path.read_text()
    with pytest.raises(KeyStoreError, match="already has keys"):
        store.create("gpu-01")


def test_rotation_keeps_the_old_key_current_until_activated_then_retires_it(
        tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.create("gpu-01")
    old = store.signing_key("gpu-01")
    assert old is not None
    assert store.rotate("gpu-01") == "k2"
    assert store.key_ids("gpu-01") == ["k1", "k2"]
    assert store.signing_key("gpu-01") == old
    with pytest.raises(KeyStoreError, match="already rotating"):
        store.rotate("gpu-01")
    with pytest.raises(KeyStoreError, match="is the one gpu-01's commands are signed with"):
        store.retire("gpu-01", "k1")
    store.activate("gpu-01", "k2")
    new = store.signing_key("gpu-01")
    assert new is not None and new[0] == "k2" and new[1] != old[1]
    store.retire("gpu-01", "k1")
    assert store.key_ids("gpu-01") == ["k2"]
    assert store.rotate("gpu-01") == "k3"


@pytest.mark.parametrize(("call", "message"), [
    (lambda s: s.rotate("gpu-09"), "has no keys"),
    (lambda s: s.activate("gpu-01", "k7"), "has no key 'k7'"),
    (lambda s: s.retire("gpu-01", "k7"), "has no key 'k7'"),
    (lambda s: s.create("../etc"), "host name"),
    (lambda s: s.create("gpu-02", "../../x"), "key id"),
])
def test_bad_requests_say_what_is_wrong_and_change_nothing(tmp_path: Path, call, message) -> None:
    store = KeyStore(tmp_path / "keys")
    store.create("gpu-01")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(KeyStoreError, match=message):
        call(store)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_key_files_notice_added_changed_and_removed_keys(tmp_path: Path) -> None:
    (tmp_path / "k1.key").write_text("one\n")
    (tmp_path / "fleet").write_text("fleet")
    files = KeyFiles({"fleet": tmp_path / "fleet"}, tmp_path)
    assert files.changed()
    assert files.load() == ({"fleet": b"fleet", "k1": b"one"}, {})
    assert not files.changed()
    (tmp_path / "k2.key").write_text("two")
    assert files.changed()
    assert files.load()[0] == {"fleet": b"fleet", "k1": b"one", "k2": b"two"}
    (tmp_path / "k1.key").unlink()
    (tmp_path / "fleet").write_text("fleet, longer now")
    assert files.changed()
    assert files.load()[0] == {"fleet": b"fleet, longer now", "k2": b"two"}
    (tmp_path / "k2.key").write_text("")
    keys, problems = files.load()
    assert keys == {"fleet": b"fleet, longer now"} and "empty" in problems["k2"]
    with pytest.raises(KeyStoreError, match="empty"):
        files.load(strict=True)


def test_the_controller_signs_with_the_hosts_current_key_else_the_legacy_files(
        tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    store = KeyStore(keys)
    store.create("gpu-01")
    (tmp_path / "fleet.key").write_text("fleet-secret\n")
    (keys / "gpu-07.key").write_text("own-secret")
    config = parse_controller('[broker]\nhost = "h"\n[commands]\nkey_file = "fleet.key"\n'
                              'keys_dir = "keys"\n', str(tmp_path / "c.toml"))
    first = config.command_key("gpu-01")
    assert first is not None and first[0] == "k1"
    assert config.command_key("gpu-07") == ("fleet", b"own-secret")
    assert config.command_key("gpu-02") == ("fleet", b"fleet-secret")
    # A rotation on disk counts from the next command: no restart, no new config.
    store.rotate("gpu-01")
    assert config.command_key("gpu-01") == first
    store.activate("gpu-01", "k2")
    second = config.command_key("gpu-01")
    assert second is not None and second[0] == "k2" and second[1] != first[1]
    assert config.command_secret("gpu-01") == second[1]


def test_cli_create_rotate_list_retire_never_prints_a_secret_unless_asked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = ["--keys-dir", str(tmp_path)]
    assert main(["keys", "create", "gpu-01", *keys]) == 0
    out = capsys.readouterr().out
    secret = (tmp_path / "gpu-01" / "k1.key").read_text().strip()
    assert secret not in out
    assert '[[commands.keys]]\nid = "k1"\nfile = "/etc/llmops/agent-keys/k1.key"' in out
    assert 'keys_dir = "/etc/llmops/agent-keys"' in out

    assert main(["keys", "rotate", "gpu-01", "--show", *keys]) == 0
    out = capsys.readouterr().out
    assert f"secret: {(tmp_path / 'gpu-01' / 'k2.key').read_text().strip()}" in out
    assert "llmops keys activate gpu-01 k2" in out and "llmops keys retire gpu-01 k1" in out

    assert main(["keys", "list", *keys]) == 0
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["gpu-01", "k1", "yes"], ["gpu-01", "k2", "-"]]

    assert main(["keys", "retire", "gpu-01", "k1", *keys]) == 1
    assert "activate another first" in capsys.readouterr().err
    assert main(["keys", "activate", "gpu-01", "k2", *keys]) == 0
    assert main(["keys", "retire", "gpu-01", "k1", *keys]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "gpu-01", *keys]) == 0
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["gpu-01", "k2", "yes"]]
    assert sorted(os.listdir(tmp_path / "gpu-01")) == ["current", "k2.key"]
    assert main(["keys", "list", "gpu-99", *keys]) == 1
