"""JSON codec for wire messages: fast (msgspec), validating, and explicit about rejections.

Every rejection is a :class:`DecodeError` with a short machine ``reason`` (for counters) and a
human ``detail`` naming the field or limit, e.g. ``schema: Expected `int`, got `str` - at `$.seq```.
"""

from __future__ import annotations

import math
from typing import Any, Final, TypeVar

import msgspec

from .messages import (
    SCHEMA_VERSION,
    Alert,
    Command,
    CommandResult,
    Event,
    Histogram,
    ReplicaSample,
    Status,
    Telemetry,
)
from .topics import TopicKind
from .views import TelemetryTotals

T = TypeVar("T", bound=msgspec.Struct)

# A telemetry snapshot with 8 GPUs and a few replicas with histograms is ~6-12 KB; these limits
# leave ample room while keeping a hostile payload from costing memory or CPU.
MAX_BYTES: Final[dict[type[Any], int]] = {
    Telemetry: 1 << 20,
    TelemetryTotals: 1 << 20,
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


class _VersionOnly(msgspec.Struct):
    """Just the ``v`` of any message, to tell a newer schema from a malformed one."""

    v: Any = SCHEMA_VERSION


_version_decoder = msgspec.json.Decoder(_VersionOnly)


class DecodeError(ValueError):
    """A payload that does not fit its type. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _finite_histogram(histogram: Histogram) -> Histogram:
    # One C-level sum is not finite if any term is not (or, harmlessly, if it overflows).
    if math.isfinite(sum(map(sum, histogram.buckets))):
        return histogram
    buckets = [(le, n) for le, n in histogram.buckets if math.isfinite(le) and math.isfinite(n)]
    return msgspec.structs.replace(histogram, buckets=buckets)


def _finite_replica(replica: ReplicaSample) -> ReplicaSample:
    if math.isfinite(sum(replica.metrics.values())) and all(
        math.isfinite(sum(map(sum, h.buckets))) for h in replica.histograms.values()
    ):
        return replica
    metrics = {name: x for name, x in replica.metrics.items() if math.isfinite(x)}
    histograms = {name: _finite_histogram(h) for name, h in replica.histograms.items()}
    return msgspec.structs.replace(replica, metrics=metrics, histograms=histograms)


def _wire_safe(message: msgspec.Struct) -> msgspec.Struct:
    """``message`` without the non-finite floats JSON cannot carry where a float is required.

    msgspec writes NaN and infinities as ``null``, which decodes to ``None`` in optional fields
    but fails a required float, and so the whole message: a Prometheus histogram's ``+Inf``
    bucket or a NaN metric would make a telemetry snapshot undecodable. Done here, on the
    sending side, so that decoding stays at msgspec's speed.
    """
    if isinstance(message, Telemetry):
        replicas = [_finite_replica(r) for r in message.replicas]
        if any(new is not old for new, old in zip(replicas, message.replicas, strict=True)):
            return msgspec.structs.replace(message, replicas=replicas)
    elif isinstance(message, ReplicaSample):
        return _finite_replica(message)
    elif isinstance(message, Histogram):
        return _finite_histogram(message)
    return message


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(_wire_safe(message))


def _unsupported(type_: type[Any], version: object) -> DecodeError:
    return DecodeError("unsupported_version",
                       f"{type_.__name__} has v={version!r}; this build speaks v={SCHEMA_VERSION}")


def _other_version(payload: bytes | bytearray | memoryview) -> object | None:
    """The ``v`` of a payload that failed validation, if it is an int other than ours."""
    try:
        version = _version_decoder.decode(payload).v
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None
    if isinstance(version, int) and not isinstance(version, bool) and version != SCHEMA_VERSION:
        return version
    return None


def decode(payload: bytes | bytearray | memoryview, type_: type[T]) -> T:
    limit = MAX_BYTES.get(type_, 64 << 10)
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    if size > limit:
        raise DecodeError("too_large", f"{size} bytes exceeds the {limit}-byte limit "
                          f"for {type_.__name__}")
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        message: T = decoder.decode(payload)
    except msgspec.ValidationError as exc:
        # A newer schema that no longer fits this one is a version problem, not a malformed one.
        version = _other_version(payload)
        if version is not None:
            raise _unsupported(type_, version) from None
        raise DecodeError("schema", f"{type_.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError("not_json", str(exc)) from None
    except UnicodeDecodeError as exc:
        # msgspec validates UTF-8 only in strings it keeps, and raises this rather than its own.
        raise DecodeError("not_json", f"invalid UTF-8: {exc}") from None
    except RecursionError:
        # msgspec recurses per nesting level (also when skipping unknown fields), so a payload
        # of many '[' would otherwise escape as RecursionError.
        raise DecodeError("too_large", f"{type_.__name__}: JSON nested too deeply") from None
    version = getattr(message, "v", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise _unsupported(type_, version)
    return message


def decode_for_topic(payload: bytes, kind: TopicKind) -> msgspec.Struct:
    return decode(payload, PAYLOAD_TYPES[kind])
