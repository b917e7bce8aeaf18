"""Signed commands to agents, and the ones still waiting for their result.

:class:`CommandSender` signs each command with the controller's key for that host
(:func:`~llm_ops_helper.proto.signing.sign_command`) and hands it to ``publish``, a synchronous
enqueue onto the broker link (QoS 1 to the agent's persistent session). It remembers what it
sent until the result comes back or the command expires, so that a result can be tied to the
replica it was about.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from llm_ops_helper.proto import codec
from llm_ops_helper.proto.messages import CommandKind, CommandResult
from llm_ops_helper.proto.signing import sign_command
from llm_ops_helper.proto.topics import TopicKind, agent_topic

log = structlog.get_logger("llmops.controller.deployments")

Publish = Callable[[str, bytes], None]


class CommandError(RuntimeError):
    """A command that could not be sent (no key for the host, the link refused it)."""


@dataclass(frozen=True, slots=True)
class Outstanding:
    id: str
    host: str
    kind: str
    replica: str | None
    sent_at: float
    expires_at: float


class CommandSender:
    """``secret_for(host)`` is the secret to sign with under ``key_id``, or a (key id, secret)
    pair: a host's own key, rotated on disk while the controller runs."""

    def __init__(self, key_id: str, secret_for: Callable[[str], bytes | tuple[str, bytes]],
                 publish: Publish,
                 ttl_s: float = 120.0, clock: Callable[[], float] = time.time,
                 new_id: Callable[[], str] = lambda: uuid.uuid4().hex) -> None:
        self.key_id = key_id
        self.secret_for = secret_for
        self.publish = publish
        self.ttl_s = ttl_s
        self.clock = clock
        self.new_id = new_id
        self.outstanding: dict[str, Outstanding] = {}
        self.sent_total = 0
        self.results_total = 0

    def send(self, host: str, kind: CommandKind, body: msgspec.Struct | Mapping[str, Any],
             replica: str | None = None) -> str:
        """Sign and publish one command; its id. Raises :class:`CommandError`."""
        try:
            key = self.secret_for(host)
        except (KeyError, LookupError, OSError) as exc:
            raise CommandError(f"no command key for host {host}: {exc}") from None
        key_id, secret = key if isinstance(key, tuple) else (self.key_id, key)
        now = self.clock()
        fields = msgspec.to_builtins(body) if isinstance(body, msgspec.Struct) else dict(body)
        command = sign_command(kind.value, fields, key_id=key_id, secret=secret,
                               command_id=self.new_id(), ttl_s=self.ttl_s, now=now)
        try:
            self.publish(agent_topic(host, TopicKind.COMMANDS), codec.encode(command))
        except Exception as exc:  # the link's own failure: the caller retries later
            raise CommandError(f"publishing {kind.value} to {host} failed: {exc}") from exc
        self.sent_total += 1
        self.outstanding[command.id] = Outstanding(command.id, host, kind.value, replica, now,
                                                   command.expires_at)
        log.info("command_sent", host=host, kind=kind.value, command_id=command.id,
                 replica=replica)
        return command.id

    def on_result(self, result: CommandResult) -> Outstanding | None:
        """The command a result answers (None: not one of ours, or already expired)."""
        sent = self.outstanding.get(result.command_id)
        if sent is None or sent.host != result.host:
            return None
        del self.outstanding[result.command_id]
        self.results_total += 1
        return sent

    def expire(self, now: float) -> list[Outstanding]:
        """Forget commands past their expiry with no result; they are the reconciler's to redo."""
        gone = [o for o in self.outstanding.values() if o.expires_at < now]
        for o in gone:
            del self.outstanding[o.id]
        return gone
