"""Commands as agents receive them: signed, verifiable, tied back to their results."""

from __future__ import annotations

import pytest

from llm_ops_helper.controller.deployments.commands import CommandError, CommandSender
from llm_ops_helper.proto import codec
from llm_ops_helper.proto.messages import Command, CommandKind, CommandResult, StopReplica
from llm_ops_helper.proto.signing import CommandRejected, CommandVerifier

SECRETS = {"host-a": b"secret-a", "host-b": b"secret-b"}


def sender(out: list[tuple[str, bytes]], now: float = 1000.0) -> CommandSender:
    return CommandSender("k1", SECRETS.__getitem__, lambda t, p: out.append((t, p)),
                         ttl_s=120.0, clock=lambda: now)


def test_commands_are_signed_with_the_hosts_key_and_verify() -> None:
    out: list[tuple[str, bytes]] = []
    s = sender(out)
    command_id = s.send("host-a", CommandKind.DRAIN_REPLICA,
                        StopReplica(name="chat-r1-abcdef", timeout_s=5), replica="chat-r1-abcdef")
    (topic, payload), = out
    assert topic == "llmops/v1/agents/host-a/commands"
    command = codec.decode(payload, Command)
    assert command.id == command_id and command.kind == "drain_replica"
    assert command.body == {"name": "chat-r1-abcdef", "drain": True, "timeout_s": 5.0}
    assert command.expires_at - command.issued_at == 120.0
    CommandVerifier({"k1": b"secret-a"}, clock=lambda: 1000.0).verify(command)
    with pytest.raises(CommandRejected, match="bad_signature"):
        CommandVerifier({"k1": b"secret-b"}, clock=lambda: 1000.0).verify(command)


def test_results_are_matched_once_and_only_from_the_right_host() -> None:
    s = sender([])
    command_id = s.send("host-a", CommandKind.STOP_REPLICA, {"name": "x"}, replica="x")
    result = CommandResult(command_id=command_id, host="host-b", status="ok", ts=1.0)
    assert s.on_result(result) is None  # another host cannot answer for host-a
    sent = s.on_result(CommandResult(command_id=command_id, host="host-a", status="ok", ts=1.0))
    assert sent is not None and sent.replica == "x" and sent.kind == "stop_replica"
    assert s.on_result(CommandResult(command_id=command_id, host="host-a", status="ok",
                                     ts=1.0)) is None


def test_unanswered_commands_expire() -> None:
    s = sender([])
    s.send("host-a", CommandKind.SYNC, {})
    assert s.expire(1100.0) == [] and len(s.outstanding) == 1
    assert len(s.expire(1121.0)) == 1 and s.outstanding == {}


def test_no_key_or_a_failing_link_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="no command key for host host-z"):
        sender([]).send("host-z", CommandKind.SYNC, {})

    def broken(topic: str, payload: bytes) -> None:
        raise ConnectionError("not connected")

    s = CommandSender("k1", SECRETS.__getitem__, broken)
    with pytest.raises(CommandError, match="publishing sync to host-a failed: not connected"):
        s.send("host-a", CommandKind.SYNC, {})
    assert s.outstanding == {}
