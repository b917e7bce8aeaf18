"""Commands from the controller: decode, verify, dispatch, answer — and never crash on them.

Every command gets a result on the ``results`` topic when its ``id`` can be read, ``ok`` or
``error`` with the reason. A command delivered twice (QoS 1 after a reconnect: the same bytes)
is answered with the result it got the first time and is not applied again; another command
with an id already seen is refused as ``replayed``. Rejections are counted by reason.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import msgspec
import structlog

from llm_ops_helper.keys import KeyFiles
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


class ReloadingVerifier(CommandVerifier):
    """A verifier whose keys are read again from their files when those change.

    Checked before each command (a few ``stat`` calls; commands are rare), so a key installed
    or removed during a rotation counts from the next command on. The replay cache is kept.
    A file that cannot be read then drops its key (logged), as a removed one does.
    """

    def __init__(self, files: KeyFiles, keys: dict[str, bytes], **kw: Any) -> None:
        super().__init__(keys, **kw)
        self.files = files

    def verify(self, command: Command) -> None:
        if self.files.changed():
            keys, problems = self.files.load()
            for key_id, problem_ in problems.items():
                log.warning("command_key_unreadable", key_id=key_id, detail=problem_)
            if keys != self.keys:
                log.info("command_keys_reloaded", key_ids=sorted(keys),
                         added=sorted(keys.keys() - self.keys.keys()),
                         removed=sorted(self.keys.keys() - keys.keys()))
                self.keys = keys
        super().verify(command)


class CommandHandler:
    def __init__(self, host: str, verifier: CommandVerifier, handlers: Mapping[str, Handler],
                 remember: int = 1000) -> None:
        self.host = host
        self.verifier = verifier
        self.handlers = dict(handlers)
        self.rejected: Counter[str] = Counter()
        # id -> (digest of the payload, its result): a redelivery gets the same answer.
        self._results: OrderedDict[str, tuple[bytes, CommandResult]] = OrderedDict()
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

        digest = hashlib.sha256(payload).digest()
        earlier = self._results.get(command.id)
        if earlier is not None and earlier[0] == digest:
            log.info("command_duplicate", command_id=command.id, kind=command.kind)
            return earlier[1]
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
        self._results[command.id] = (digest, result)
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
    except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError):
        # msgspec recurses per nesting level, also through fields it skips: a payload of many
        # '[' would otherwise escape here and stop the agent.
        return None
