"""Commands from the controller: decode, verify, dispatch, answer — and never crash on them.

Every command gets a result on the ``results`` topic when its ``id`` can be read, ``ok`` or
``error`` with the reason. A command delivered twice (QoS 1 after a reconnect) is answered with
the result it got the first time and is not applied again. Rejections are counted by reason.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import msgspec
import structlog

from llm_ops_helper.proto.codec import DecodeError, decode
from llm_ops_helper.proto.messages import Command, CommandKind, CommandResult
from llm_ops_helper.proto.signing import CommandRejected, CommandVerifier
from llm_ops_helper.tomlfile import problem

log = structlog.get_logger("llmops.agent.commands")

Handler = Callable[[Command], Awaitable[dict[str, Any]]]
T = TypeVar("T", bound=msgspec.Struct)


class CommandFailed(Exception):
    """Raised by a handler for an expected failure; its message becomes the result's error."""


def body_as(command: Command, type_: type[T]) -> T:
    """The command's body as ``type_``; :class:`CommandFailed` naming the field that is wrong."""
    try:
        return msgspec.convert(command.body, type_)
    except msgspec.ValidationError as exc:
        found = problem(exc)
        if found.kind == "missing_key":
            detail = "required field is missing"
        elif found.kind == "unknown_key":
            detail = "unknown field"
        else:
            detail = found.detail
        field = found.key or "(body)"
        raise CommandFailed(f"{command.kind} body: field '{field}': {detail}") from None


class _IdOnly(msgspec.Struct):
    id: str


class CommandHandler:
    def __init__(self, host: str, verifier: CommandVerifier, handlers: Mapping[str, Handler],
                 remember: int = 1000) -> None:
        self.host = host
        self.verifier = verifier
        self.handlers = dict(handlers)
        self.rejected: Counter[str] = Counter()
        self._results: OrderedDict[str, CommandResult] = OrderedDict()
        self._remember = remember

    def _error(self, command_id: str, reason: str, detail: str) -> CommandResult:
        self.rejected[reason] += 1
        return CommandResult(command_id=command_id, host=self.host, status="error",
                             ts=time.time(), error=f"{reason}: {detail}")

    async def handle(self, payload: bytes) -> CommandResult | None:
        try:
            command = decode(payload, Command)
        except DecodeError as exc:
            command_id = _best_effort_id(payload)
            log.warning("command_rejected", reason=f"decode_{exc.reason}", detail=exc.detail[:200],
                        command_id=command_id, size=len(payload))
            if command_id is None:
                self.rejected[f"decode_{exc.reason}"] += 1
                return None
            return self._error(command_id, f"decode_{exc.reason}", exc.detail[:500])

        earlier = self._results.get(command.id)
        if earlier is not None:
            log.info("command_duplicate", command_id=command.id, kind=command.kind)
            return earlier
        try:
            self.verifier.verify(command)
        except CommandRejected as exc:
            log.warning("command_rejected", reason=exc.reason, detail=exc.detail,
                        command_id=command.id, kind=command.kind, key_id=command.key_id)
            return self._error(command.id, exc.reason, exc.detail)

        handler = self.handlers.get(command.kind)
        if handler is None:
            known = ", ".join(k.value for k in CommandKind)
            reason = "unsupported_kind" if command.kind in set(CommandKind) else "unknown_kind"
            log.warning("command_rejected", reason=reason, command_id=command.id, kind=command.kind)
            result = self._error(command.id, reason, f"this agent does not handle {command.kind!r} "
                                 f"(known kinds: {known})")
        else:
            result = await self._apply(command, handler)
        self._results[command.id] = result
        while len(self._results) > self._remember:
            self._results.popitem(last=False)
        return result

    async def _apply(self, command: Command, handler: Handler) -> CommandResult:
        try:
            detail = await handler(command)
        except CommandFailed as exc:
            log.warning("command_failed", command_id=command.id, kind=command.kind, error=str(exc))
            return self._error(command.id, "failed", str(exc))
        except Exception as exc:
            log.exception("command_internal_error", command_id=command.id, kind=command.kind)
            return self._error(command.id, "internal_error", f"{type(exc).__name__}: {exc}")
        log.info("command_applied", command_id=command.id, kind=command.kind)
        return CommandResult(command_id=command.id, host=self.host, status="ok", ts=time.time(),
                             detail=detail)


def _best_effort_id(payload: bytes) -> str | None:
    """The ``id`` of a command that failed validation, so the sender can still be answered."""
    if len(payload) > 256 << 10:
        return None
    try:
        return msgspec.json.decode(payload, type=_IdOnly).id[:200]
    except msgspec.MsgspecError:
        return None
