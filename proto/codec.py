"""JSON codec for wire messages: fast (msgspec), validating, and explicit about rejections.

Every rejection is a :class:`DecodeError` with a short machine ``reason`` (for counters) and a
human ``detail`` naming the field or limit, e.g. ``schema: Expected `int`, got `str` - at `$.seq```.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgspec

from llm_ops_helper.proto.messages import (
    SCHEMA_VERSION,
    Alert,
    Command,
    CommandResult,
    Event,
    Status,
    Telemetry,
)
from llm_ops_helper.proto.topics import TopicKind

T = TypeVar("T", bound=msgspec.Struct)

# A telemetry snapshot with 8 GPUs and a few replicas with histograms is ~6-12 KB; these limits
# leave ample room while keeping a hostile payload from costing memory or CPU.
MAX_BYTES: Final[dict[type[Any], int]] = {
    Telemetry: 1 << 20,
    Status: 64 << 10,
    Event: 64 << 10,
    Command: 256 << 10,
    CommandResult: 256 << 10,
    Alert: 64 << 10,
}

PAYLOAD_TYPES: Final[dict[TopicKind, type[msgspec.Struct]]] = {
    TopicKind.STATUS: Status,
    TopicKind.TELEMETRY: Telemetry,
    TopicKind.EVENTS: Event,
    TopicKind.COMMANDS: Command,
    TopicKind.RESULTS: CommandResult,
}

REASONS: Final = ("too_large", "not_json", "schema", "unsupported_version")

_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


class DecodeError(ValueError):
    """A payload that does not fit its type. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(payload: bytes | bytearray | memoryview, type_: type[T]) -> T:
    limit = MAX_BYTES.get(type_, 64 << 10)
    if len(payload) > limit:
        raise DecodeError("too_large", f"{len(payload)} bytes exceeds the {limit}-byte limit "
                          f"for {type_.__name__}")
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        message = decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise DecodeError("schema", f"{type_.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError("not_json", str(exc)) from None
    version = getattr(message, "v", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise DecodeError("unsupported_version",
                          f"{type_.__name__} has v={version}; this build speaks v={SCHEMA_VERSION}")
    return message


def decode_for_topic(payload: bytes, kind: TopicKind) -> msgspec.Struct:
    return decode(payload, PAYLOAD_TYPES[kind])
