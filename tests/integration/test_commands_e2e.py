"""Signed commands end to end: keys from `llmops keys`, a real agent process, a real Mosquitto.

The controller's side is its own code path (ControllerConfig.command_key over the key store);
each command goes through the broker to the agent, whose answer comes back on the results
topic, and whose refusals show in its telemetry counters.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from llm_ops_helper.broker import LocalMosquitto
from llm_ops_helper.controller.config import ControllerConfig
from llm_ops_helper.controller.config import parse as parse_controller
from llm_ops_helper.keys import KeyStore
from llm_ops_helper.proto.codec import encode
from llm_ops_helper.proto.messages import Command, CommandResult, Telemetry
from llm_ops_helper.proto.signing import sign_command
from tests.integration.harness import AgentProcess, Recorder, agent_config, publish

HOST = "gpu-sec"
TOPIC = f"llmops/v1/agents/{HOST}/commands"


class Fleet:
    """One agent with its own keys_dir, the controller's key store and config, a recorder."""

    def __init__(self, tmp_path: Path, mosquitto: LocalMosquitto, rec: Recorder) -> None:
        self.store = KeyStore(tmp_path / "controller-keys")
        self.store.create(HOST)
        self.agent_keys = tmp_path / "agent-keys"
        self.agent_keys.mkdir()
        self.install("k1")
        self.controller: ControllerConfig = parse_controller(
            f'[broker]\nhost = "h"\n[commands]\nkeys_dir = "{self.store.root}"\n',
            str(tmp_path / "controller.toml"))
        self.agent = AgentProcess(tmp_path / "agent", agent_config(
            mosquitto, host=HOST, commands={"keys_dir": str(self.agent_keys)}))
        self.mosquitto = mosquitto
        self.rec = rec

    def install(self, key_id: str) -> None:
        """What the operator does on the agent host: copy the key file there."""
        shutil.copy2(self.store.path(HOST, key_id), self.agent_keys / f"{key_id}.key")

    def secret(self, key_id: str) -> bytes:
        return self.store.path(HOST, key_id).read_bytes().strip()

    def signed(self, command_id: str, **kw: Any) -> Command:
        """A sync signed the way the controller signs it now (its current key for the host)."""
        key = self.controller.command_key(HOST)
        assert key is not None
        return sign_command("sync", {}, key_id=key[0], secret=key[1], command_id=command_id, **kw)

    async def send(self, payload: Command | bytes) -> CommandResult:
        """Publish one command and wait for its (next) answer."""
        data = payload if isinstance(payload, bytes) else encode(payload)
        command_id = msgspec.json.decode(data)["id"]
        before = len(self.answers(command_id))
        await publish(self.mosquitto, TOPIC, data)
        answers = await self.rec.wait_for(
            lambda: self.answers(command_id)[before:], 10.0, f"the answer to {command_id}")
        result: CommandResult = answers[0]
        return result

    def answers(self, command_id: str) -> list[CommandResult]:
        return [r for r in self.rec.of("results", CommandResult) if r.command_id == command_id]

    async def counters_after(self, seq: int) -> dict[str, int]:
        latest = await self.rec.wait_for(
            lambda: [t for t in self.rec.of("telemetry", Telemetry) if t.seq > seq + 1], 10.0,
            "telemetry after the commands")
        rejected: dict[str, int] = latest[-1].agent.commands_rejected
        return rejected


@pytest.fixture
async def fleet(tmp_path: Path, mosquitto: LocalMosquitto) -> AsyncIterator[Fleet]:
    async with Recorder(mosquitto) as rec:
        fleet = Fleet(tmp_path, mosquitto, rec)
        fleet.agent.start()
        try:
            await rec.wait_for(lambda: rec.of("telemetry", Telemetry), 10.0, "telemetry")
            yield fleet
        finally:
            await fleet.agent.close()


def _reason(result: CommandResult) -> str:
    assert result.status == "error" and result.error is not None, result
    return result.error.split(":")[0]


async def test_forged_expired_replayed_unsigned_and_unknown_key_commands_are_refused(
        fleet: Fleet) -> None:
    good = fleet.signed("good")
    first = await fleet.send(good)
    assert first.status == "ok" and first.host == HOST
    # The same bytes again (a QoS 1 redelivery, or a verbatim replay): the first answer, the
    # command not applied a second time.
    assert await fleet.send(good) == first

    seq = fleet.rec.of("telemetry", Telemetry)[-1].seq
    forged = sign_command("sync", {}, key_id="k1", secret=b"not-the-key", command_id="forged")
    tampered = msgspec.structs.replace(fleet.signed("tampered"), body={"replica": "evil"})
    expired = fleet.signed("expired", now=good.issued_at - 3600, ttl_s=60)
    replayed = fleet.signed("good", now=good.issued_at + 1)  # the id again, signed anew
    unsigned = msgspec.structs.replace(fleet.signed("unsigned"), sig="")
    unknown = sign_command("sync", {}, key_id="k9", secret=fleet.secret("k1"),
                           command_id="unknown")
    reasons = {c.id + ("-again" if c is replayed else ""): _reason(await fleet.send(c))
               for c in (forged, tampered, expired, replayed, unsigned, unknown)}
    assert reasons == {"forged": "bad_signature", "tampered": "bad_signature",
                       "expired": "expired", "good-again": "replayed", "unsigned": "unsigned",
                       "unknown": "unknown_key"}
    assert await fleet.counters_after(seq) == {"bad_signature": 2, "expired": 1, "replayed": 1,
                                               "unsigned": 1, "unknown_key": 1}
    assert fleet.agent.process is not None and fleet.agent.process.poll() is None
    log = fleet.agent.log()
    for reason in ("bad_signature", "expired", "replayed", "unsigned", "unknown_key"):
        assert f'"reason": "{reason}"' in log


async def test_a_rotation_keeps_commands_flowing_and_the_retired_key_is_refused(
        fleet: Fleet) -> None:
    old = fleet.secret("k1")
    assert (await fleet.send(fleet.signed("before"))).status == "ok"

    new_id = fleet.store.rotate(HOST)  # 1. a new key beside the old; still signing with k1
    new = fleet.secret(new_id)
    assert new_id == "k2"
    assert (await fleet.send(fleet.signed("still-k1"))).status == "ok"
    by_new = sign_command("sync", {}, key_id="k2", secret=new, command_id="too-early")
    assert _reason(await fleet.send(by_new)) == "unknown_key"

    fleet.install("k2")  # 2. installed on the agent, no restart: both keys are valid
    for key_id, secret in (("k1", old), ("k2", new)):
        both = sign_command("sync", {}, key_id=key_id, secret=secret, command_id=f"both-{key_id}")
        assert (await fleet.send(both)).status == "ok"

    fleet.store.activate(HOST, "k2")  # 3. the controller signs with the new key
    switched = fleet.signed("switched")
    assert switched.key_id == "k2"
    assert (await fleet.send(switched)).status == "ok"

    fleet.store.retire(HOST, "k1")  # 4. the old key goes, on both sides
    (fleet.agent_keys / "k1.key").unlink()
    by_old = sign_command("sync", {}, key_id="k1", secret=old, command_id="after-retire")
    assert _reason(await fleet.send(by_old)) == "unknown_key"
    assert (await fleet.send(fleet.signed("after"))).status == "ok"
    assert '"event": "command_keys_reloaded"' in fleet.agent.log()
    assert fleet.agent.process is not None and fleet.agent.process.poll() is None
