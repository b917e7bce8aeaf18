"""Hostile and honest commands: every one answered or counted, none applied twice."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

from llm_ops_helper.agent.commands import CommandFailed, CommandHandler
from llm_ops_helper.proto.codec import encode
from llm_ops_helper.proto.messages import Command
from llm_ops_helper.proto.signing import CommandVerifier, sign_command

KEY = b"s3cret-key-for-tests"


def _handler(applied: list[str]) -> CommandHandler:
    async def sync(command: Command) -> dict[str, Any]:
        applied.append(command.id)
        return {"replicas": []}

    async def fails(command: Command) -> dict[str, Any]:
        raise CommandFailed("disk full")

    async def buggy(command: Command) -> dict[str, Any]:
        raise KeyError("model")

    return CommandHandler("gpu-1", CommandVerifier({"k1": KEY}),
                          {"sync": sync, "stop_replica": fails, "drain_replica": buggy})


def _signed(kind: str = "sync", command_id: str = "c1", **kw: Any) -> bytes:
    return encode(sign_command(kind, {}, key_id="k1", secret=KEY, command_id=command_id, **kw))


async def test_valid_command_is_applied_once_and_a_redelivery_gets_the_same_result() -> None:
    applied: list[str] = []
    handler = _handler(applied)
    payload = _signed()
    first = await handler.handle(payload)
    again = await handler.handle(payload)
    assert first is not None and first.status == "ok" and first.detail == {"replicas": []}
    assert again == first
    assert applied == ["c1"]


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\x00\xffgarbage", "decode_not_json"),
    (b'{"id": "x1", "kind": 3}', "decode_schema"),
    (b'{"v": 1, "id": "x1", "kind": "sync", "issued_at": 1, "expires_at": 2, "key_id": "k1", "sig": ""}', "unsigned"),
    (b" " * (300 << 10), "decode_too_large"),
])
async def test_malformed_payloads_are_counted_and_answered_when_the_id_is_readable(
        payload: bytes, reason: str) -> None:
    handler = _handler([])
    result = await handler.handle(payload)
    assert handler.rejected[reason] == 1
    if b'"id"' in payload:
        assert result is not None and result.status == "error" and result.command_id == "x1"
        assert result.error is not None and result.error.startswith(reason)
    else:
        assert result is None


async def test_forged_expired_and_unknown_key_commands_are_refused() -> None:
    applied: list[str] = []
    handler = _handler(applied)
    good = msgspec.json.decode(_signed(command_id="f1"))
    forged = encode(Command(**{**good, "body": {"evil": True}}))
    expired = _signed(command_id="e1", now=time.time() - 3600)
    other_key = encode(sign_command("sync", {}, key_id="k9", secret=b"x", command_id="u1"))
    results = [await handler.handle(p) for p in (forged, expired, other_key)]
    assert [r.error.split(":")[0] for r in results if r and r.error] == [
        "bad_signature", "expired", "unknown_key"]
    assert applied == []


async def test_unknown_and_failing_kinds_answer_errors_and_never_raise() -> None:
    handler = _handler([])
    unknown = await handler.handle(_signed(kind="format_disk", command_id="k-1"))
    unsupported = await handler.handle(_signed(kind="deploy_replica", command_id="k-2"))
    failed = await handler.handle(_signed(kind="stop_replica", command_id="k-3"))
    bug = await handler.handle(_signed(kind="drain_replica", command_id="k-4"))
    assert unknown is not None and unknown.error is not None
    assert unknown.error.startswith("unknown_kind")
    assert unsupported is not None and unsupported.error is not None
    assert unsupported.error.startswith("unsupported_kind")
    assert failed is not None and failed.error == "failed: disk full"
    assert bug is not None and bug.error is not None and bug.error.startswith("internal_error")
    assert dict(handler.rejected) == {"unknown_kind": 1, "unsupported_kind": 1, "failed": 1,
                                      "internal_error": 1}
