"""The wire contract between agents and the controller: topics, messages, codec, signing.

Imports nothing else of this project, so both sides (and third-party tools) can depend on it.
"""

from .codec import DecodeError, decode, encode
from .messages import (
    SCHEMA_VERSION,
    Alert,
    Command,
    CommandKind,
    CommandResult,
    Event,
    GpuInfo,
    GpuSample,
    Histogram,
    HostSample,
    ReplicaSample,
    Status,
    Telemetry,
)
from .signing import CommandRejected, CommandVerifier, sign_command
from .topics import AgentTopic, TopicError, TopicKind

__all__ = [
    "SCHEMA_VERSION",
    "AgentTopic",
    "Alert",
    "Command",
    "CommandKind",
    "CommandRejected",
    "CommandResult",
    "CommandVerifier",
    "DecodeError",
    "Event",
    "GpuInfo",
    "GpuSample",
    "Histogram",
    "HostSample",
    "ReplicaSample",
    "Status",
    "Telemetry",
    "TopicError",
    "TopicKind",
    "decode",
    "encode",
    "sign_command",
]
