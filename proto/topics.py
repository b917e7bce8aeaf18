"""MQTT topics as small value objects that validate themselves.

Layout: ``llmops/v1/agents/{host}/{kind}`` for everything an agent sends or receives, and
``llmops/v1/alerts`` for the controller's alerts.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

PREFIX = "llmops/v1"
ALERTS = f"{PREFIX}/alerts"

# A host name becomes one topic level: no MQTT wildcards, no separators, bounded length.
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class TopicError(ValueError):
    """A topic or host name that does not fit the wire contract."""


class TopicKind(enum.StrEnum):
    STATUS = "status"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    COMMANDS = "commands"
    RESULTS = "results"


def validate_host(host: str) -> str:
    if not _HOST_RE.fullmatch(host):
        raise TopicError(
            f"host name {host!r} is not usable in a topic: expected 1-63 characters of "
            "letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return host


@dataclass(frozen=True, slots=True)
class AgentTopic:
    host: str
    kind: TopicKind

    def __post_init__(self) -> None:
        validate_host(self.host)

    def __str__(self) -> str:
        return f"{PREFIX}/agents/{self.host}/{self.kind.value}"

    @classmethod
    def parse(cls, topic: str) -> AgentTopic:
        parts = topic.split("/")
        if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[2] != "agents":
            raise TopicError(
                f"topic {topic!r} is not of the form {PREFIX}/agents/{{host}}/{{kind}}"
            )
        try:
            kind = TopicKind(parts[4])
        except ValueError:
            known = ", ".join(k.value for k in TopicKind)
            raise TopicError(
                f"topic {topic!r} has unknown kind {parts[4]!r} (known: {known})"
            ) from None
        return cls(parts[3], kind)


def agent_topic(host: str, kind: TopicKind) -> str:
    return str(AgentTopic(host, kind))


def all_agents(kind: TopicKind) -> str:
    """The subscription filter for one kind of message from every agent."""
    return f"{PREFIX}/agents/+/{kind.value}"
