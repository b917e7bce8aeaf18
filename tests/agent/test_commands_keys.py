"""The agent's command keys: read at start-up, read again when their files change."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from llm_ops_helper.agent import config as agent_config
from llm_ops_helper.agent import wiring
from llm_ops_helper.agent.commands import CommandHandler
from llm_ops_helper.agent.config import ConfigError
from llm_ops_helper.keys import KeyStore
from llm_ops_helper.proto.codec import encode
from llm_ops_helper.proto.messages import Command
from llm_ops_helper.proto.signing import sign_command


def _config(tmp_path: Path, commands: str) -> agent_config.AgentConfig:
    toml = tmp_path / "agent.toml"
    toml.write_text(f'[broker]\nhost = "localhost"\n{commands}')
    return agent_config.load(str(toml))


def _handler(config: agent_config.AgentConfig) -> CommandHandler:
    async def sync(command: Command) -> dict[str, Any]:
        return {}

    return CommandHandler("gpu-01", wiring.build_verifier(config), {"sync": sync})


async def _answer(handler: CommandHandler, key_id: str, secret: bytes, command_id: str,
                  **kw: Any) -> str:
    result = await handler.handle(encode(sign_command("sync", {}, key_id=key_id, secret=secret,
                                                      command_id=command_id, **kw)))
    assert result is not None
    return result.status if result.error is None else result.error.split(":")[0]


async def test_a_key_added_to_keys_dir_counts_at_once_and_a_removed_one_stops(
        tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "controller")
    store.create("gpu-01")
    agent_keys = tmp_path / "agent-keys"
    agent_keys.mkdir()
    (agent_keys / "k1.key").write_bytes((store.path("gpu-01", "k1")).read_bytes())
    handler = _handler(_config(tmp_path, f'[commands]\nkeys_dir = "{agent_keys}"\n'))
    k1 = store.path("gpu-01", "k1").read_bytes().strip()
    assert await _answer(handler, "k1", k1, "a") == "ok"

    store.rotate("gpu-01")
    k2 = store.path("gpu-01", "k2").read_bytes().strip()
    assert await _answer(handler, "k2", k2, "b") == "unknown_key"
    (agent_keys / "k2.key").write_bytes(store.path("gpu-01", "k2").read_bytes())
    assert await _answer(handler, "k2", k2, "c") == "ok"
    assert await _answer(handler, "k1", k1, "d") == "ok"  # both, during the rotation

    (agent_keys / "k1.key").unlink()
    assert await _answer(handler, "k1", k1, "e") == "unknown_key"
    assert await _answer(handler, "k2", k2, "f") == "ok"
    # The replay cache outlives a reload.
    assert await _answer(handler, "k2", k2, "c", ttl_s=30) == "replayed"
    assert dict(handler.rejected) == {"unknown_key": 2, "replayed": 1}


async def test_a_listed_key_file_is_read_again_when_rewritten(tmp_path: Path) -> None:
    (tmp_path / "fleet.key").write_text("first\n")
    handler = _handler(_config(tmp_path, '[[commands.keys]]\nid = "fleet"\nfile = "fleet.key"\n'))
    assert await _answer(handler, "fleet", b"first", "a") == "ok"
    (tmp_path / "fleet.key").write_text("second, longer\n")
    assert await _answer(handler, "fleet", b"first", "b") == "bad_signature"
    assert await _answer(handler, "fleet", b"second, longer", "c") == "ok"


async def test_same_bytes_again_get_the_first_answer_another_command_with_that_id_is_replayed(
        tmp_path: Path) -> None:
    (tmp_path / "fleet.key").write_text("s")
    handler = _handler(_config(tmp_path, '[[commands.keys]]\nid = "fleet"\nfile = "fleet.key"\n'))
    payload = encode(sign_command("sync", {}, key_id="fleet", secret=b"s", command_id="r1"))
    first = await handler.handle(payload)
    assert first is not None and first.status == "ok"
    assert await handler.handle(payload) == first
    assert await _answer(handler, "fleet", b"s", "r1", ttl_s=59) == "replayed"
    assert await _answer(handler, "fleet", b"forged", "r1") == "bad_signature"


@pytest.mark.parametrize(("commands", "message"), [
    ('[commands]\nkeys_dir = "nope"\n', "key 'commands.keys_dir': no such directory"),
    ('[[commands.keys]]\nid = "k1"\nfile = "nope.key"\n',
     "key 'commands.keys[0].file': cannot read secret file"),
])
def test_bad_key_settings_stop_the_start_naming_the_key(
        tmp_path: Path, commands: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        wiring.build_verifier(_config(tmp_path, commands))


def test_an_empty_key_file_in_keys_dir_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k1.key").write_text("")
    with pytest.raises(ConfigError, match=r"key 'commands\.keys_dir': key file .* is empty"):
        wiring.build_verifier(_config(tmp_path, '[commands]\nkeys_dir = "keys"\n'))
