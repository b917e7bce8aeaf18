"""Codec: round trips of every message type, and each kind of rejection with its reason."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_ops_helper.proto import (
    SCHEMA_VERSION,
    Alert,
    Command,
    CommandResult,
    DecodeError,
    Event,
    GpuInfo,
    GpuSample,
    Histogram,
    HostSample,
    ReplicaSample,
    Status,
    Telemetry,
    TopicKind,
    decode,
    encode,
)
from llm_ops_helper.proto.codec import MAX_BYTES, PAYLOAD_TYPES, REASONS, decode_for_topic
from llm_ops_helper.proto.messages import AgentCounters, CollectorStat
from tests.proto import FINITE_FLOATS, MESSAGE_TYPES, MINIMAL, SAMPLES, full_telemetry, structs


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def reject(payload: bytes | bytearray | memoryview, type_: type[msgspec.Struct]) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(payload, type_)
    assert info.value.reason in REASONS
    return info.value


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_round_trip_every_message_type(type_: type[msgspec.Struct], data: st.DataObject) -> None:
    message = data.draw(structs(type_))
    payload = encode(message)
    assert isinstance(payload, bytes)
    decoded = decode(payload, type_)
    assert decoded == message
    assert type(decoded) is type_
    assert encode(decoded) == payload


@pytest.mark.parametrize(
    "type_",
    [GpuInfo, GpuSample, HostSample, Histogram, ReplicaSample, CollectorStat, AgentCounters],
    ids=lambda t: t.__name__,
)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip_nested_structs(type_: type[msgspec.Struct], data: st.DataObject) -> None:
    message = data.draw(structs(type_))
    assert decode(encode(message), type_) == message


def test_full_telemetry_round_trip_and_size() -> None:
    telemetry = full_telemetry()
    payload = encode(telemetry)
    assert len(payload) < MAX_BYTES[Telemetry] // 16
    decoded = decode(payload, Telemetry)
    assert decoded == telemetry
    assert decoded.gpus[7].uuid == "GPU-00000007"
    assert decoded.gpus[0].retired_pages is None  # None stays "not reported", never 0
    assert decoded.replicas[3].histograms["ttft_seconds"].buckets[0] == (0.005, 100.0)
    assert decoded.host_metrics is not None
    assert decoded.host_metrics.memory_total_bytes == 2 << 40
    assert decoded.v == SCHEMA_VERSION


def test_each_payload_type_round_trips_with_content() -> None:
    for type_, messages in SAMPLES.items():
        for message in messages:
            assert type(message) is type_
            assert decode(encode(message), type_) == message


def test_non_finite_values_cannot_break_a_telemetry_message() -> None:
    # Prometheus histograms always end in a +Inf bucket and text metrics may be NaN; JSON
    # carries neither, so they must not make the whole snapshot undecodable.
    histogram = Histogram(sum=2.0, count=3.0, buckets=[(0.1, 1.0), (1.0, 2.0), (math.inf, 3.0)])
    replica = ReplicaSample(name="r", runtime="vllm", up=True,
                            metrics={"ok": 1.0, "nan": math.nan, "inf": math.inf, "big": 1e308,
                                     "big2": 1e308},
                            histograms={"ttft_seconds": histogram,
                                        "nan_count": Histogram(sum=0.0, count=0.0,
                                                               buckets=[(1.0, math.nan)])})
    gpu = GpuSample(index=0, uuid="u", temperature_c=math.nan, power_w=math.inf)
    telemetry = Telemetry(host="h", run_id="r", seq=1, ts=1.0, interval_s=1.0,
                          gpus=[gpu], replicas=[replica, replica])
    decoded = decode(encode(telemetry), Telemetry)
    for sent in decoded.replicas:
        assert sent.metrics == {"ok": 1.0, "big": 1e308, "big2": 1e308}
        assert sent.histograms["ttft_seconds"] == Histogram(sum=2.0, count=3.0,
                                                            buckets=[(0.1, 1.0), (1.0, 2.0)])
        assert sent.histograms["nan_count"].buckets == []
    assert decoded.gpus[0].temperature_c is None  # optional floats: "not reported"
    assert decoded.gpus[0].power_w is None
    # Sending does not change the caller's message.
    assert telemetry.replicas[0].histograms["ttft_seconds"].buckets[-1] == (math.inf, 3.0)
    # The parts can be sent on their own, too.
    assert decode(encode(histogram), Histogram).buckets == [(0.1, 1.0), (1.0, 2.0)]
    assert decode(encode(replica), ReplicaSample) == decoded.replicas[0]


ANY_FLOATS = st.floats()  # NaN and infinities included

REPLICAS_WITH_ANY_FLOATS = st.builds(
    ReplicaSample,
    name=st.just("r"), runtime=st.just("vllm"), up=st.booleans(),
    scrape_ms=ANY_FLOATS | st.none(),
    metrics=st.dictionaries(st.text(max_size=4), ANY_FLOATS, max_size=4),
    histograms=st.dictionaries(st.text(max_size=4), st.builds(
        Histogram, sum=FINITE_FLOATS, count=FINITE_FLOATS,
        buckets=st.lists(st.tuples(ANY_FLOATS, ANY_FLOATS), max_size=4),
    ), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(replicas=st.lists(REPLICAS_WITH_ANY_FLOATS, max_size=3),
       temperature=ANY_FLOATS | st.none())
def test_non_finite_floats_where_prometheus_has_them_always_decode(
    replicas: list[ReplicaSample], temperature: float | None
) -> None:
    telemetry = Telemetry(host="h", run_id="r", seq=1, ts=1.0, interval_s=1.0, replicas=replicas,
                          gpus=[GpuSample(index=0, uuid="u", temperature_c=temperature)])
    decoded = decode(encode(telemetry), Telemetry)
    for sent, kept in zip(decoded.replicas, replicas, strict=True):
        assert sent.metrics == {k: x for k, x in kept.metrics.items() if math.isfinite(x)}
        for name, histogram in sent.histograms.items():
            assert histogram.buckets == [
                b for b in kept.histograms[name].buckets if all(map(math.isfinite, b))]
    assert decoded.gpus[0].temperature_c == (
        temperature if temperature is not None and math.isfinite(temperature) else None)


def test_finite_messages_are_sent_as_they_are() -> None:
    telemetry = full_telemetry()
    assert encode(telemetry) == msgspec.json.encode(telemetry)


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_minimal_payloads_decode_with_defaults(type_: type[msgspec.Struct]) -> None:
    message = decode(dumps(MINIMAL[type_]), type_)
    assert message.v == SCHEMA_VERSION  # type: ignore[attr-defined]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    payload = encode(full_telemetry(gpus=1, replicas=1))
    assert decode(bytearray(payload), Telemetry) == decode(memoryview(payload), Telemetry)


def test_decode_for_topic_picks_the_payload_type() -> None:
    assert set(PAYLOAD_TYPES) == set(TopicKind)
    for kind, type_ in PAYLOAD_TYPES.items():
        message = decode_for_topic(dumps(MINIMAL[type_]), kind)
        assert type(message) is type_
    with pytest.raises(DecodeError) as info:
        decode_for_topic(dumps(MINIMAL[Status]), TopicKind.TELEMETRY)
    assert info.value.reason == "schema"


# --- unknown and missing fields ------------------------------------------------------------


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_unknown_fields_are_ignored(type_: type[msgspec.Struct]) -> None:
    payload = {**MINIMAL[type_], "added_in_v1_7": {"nested": [1, 2, {"x": None}]}, "zz": 1.5}
    assert decode(dumps(payload), type_) == decode(dumps(MINIMAL[type_]), type_)


def test_unknown_fields_in_nested_structs_are_ignored() -> None:
    payload = {**MINIMAL[Telemetry],
               "gpus": [{"index": 0, "uuid": "u", "new_counter": 5, "nested": {"a": [1]}}],
               "replicas": [{"name": "r", "runtime": "vllm", "up": True, "shard": 2,
                             "histograms": {"h": {"sum": 1, "count": 1, "exemplars": []}}}]}
    message = decode(dumps(payload), Telemetry)
    assert message.gpus == [GpuSample(index=0, uuid="u")]
    assert message.replicas[0].histograms["h"] == Histogram(sum=1.0, count=1.0)


@pytest.mark.parametrize(
    ("type_", "field"),
    [(t, f) for t, fields in MINIMAL.items() for f in fields],
    ids=lambda x: x.__name__ if isinstance(x, type) else x,
)
def test_missing_required_field_is_named(type_: type[msgspec.Struct], field: str) -> None:
    payload = {k: v for k, v in MINIMAL[type_].items() if k != field}
    error = reject(dumps(payload), type_)
    assert error.reason == "schema"
    assert f"missing required field `{field}`" in error.detail
    assert type_.__name__ in error.detail


def test_missing_nested_field_names_the_path() -> None:
    payload = {**MINIMAL[Telemetry], "gpus": [{"index": 0, "uuid": "u"}, {"uuid": "v"}]}
    error = reject(dumps(payload), Telemetry)
    assert error.reason == "schema"
    assert "`index`" in error.detail
    assert "$.gpus[1]" in error.detail


@pytest.mark.parametrize(
    ("type_", "patch", "path"),
    [
        (Telemetry, {"seq": "7"}, "$.seq"),
        (Telemetry, {"seq": 1.5}, "$.seq"),
        (Telemetry, {"seq": True}, "$.seq"),
        (Telemetry, {"ts": "now"}, "$.ts"),
        (Telemetry, {"gpus": {}}, "$.gpus"),
        (Telemetry, {"gpus": [{"index": "0", "uuid": "u"}]}, "$.gpus[0].index"),
        (Telemetry, {"replicas": [{"name": "r", "runtime": "x", "up": True,
                                   "metrics": {"m": "high"}}]}, "$.replicas[0].metrics"),
        (Telemetry, {"replicas": [{"name": "r", "runtime": "x", "up": True, "histograms": {
            "h": {"sum": 1, "count": 1, "buckets": [[1.0]]}}}]}, "$.replicas[0].histograms"),
        (Telemetry, {"host": None}, "$.host"),
        (Status, {"state": "sleeping"}, "$.state"),
        (Status, {"gpus": [{"index": 0, "uuid": "u", "name": 5}]}, "$.gpus[0].name"),
        (Event, {"severity": "fatal"}, "$.severity"),
        (Event, {"data": {"k": [1]}}, "$.data"),
        (Command, {"body": []}, "$.body"),
        (Command, {"expires_at": None}, "$.expires_at"),
        (CommandResult, {"status": "maybe"}, "$.status"),
        (Alert, {"labels": {"a": 1}}, "$.labels"),
        (Alert, {"gpu": 1.5}, "$.gpu"),
    ],
)
def test_wrong_type_names_the_path(
    type_: type[msgspec.Struct], patch: dict[str, Any], path: str
) -> None:
    error = reject(dumps({**MINIMAL[type_], **patch}), type_)
    assert error.reason == "schema"
    assert f"`{path}" in error.detail


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("payload", [b"[]", b"1", b'"x"', b"null", b"true"])
def test_non_object_is_schema(type_: type[msgspec.Struct], payload: bytes) -> None:
    assert reject(payload, type_).reason == "schema"


# --- not JSON, too large, versions ---------------------------------------------------------


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize(
    "payload",
    [b"", b" ", b"not json", b"{", b'{"host": "h1",', b"\xff\xfe", b"{'a': 1}", b"NaN",
     b'{"ts": NaN}', b'{"a": "\\ud800"}',],
)
def test_not_json(type_: type[msgspec.Struct], payload: bytes) -> None:
    assert reject(payload, type_).reason == "not_json"


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"])
def test_invalid_utf8_in_a_string_is_not_json(type_: type[msgspec.Struct], bad: bytes) -> None:
    # msgspec raises UnicodeDecodeError (not its DecodeError) for these; decode must not leak it.
    first = next(k for k, v in MINIMAL[type_].items() if isinstance(v, str))
    payload = dumps(MINIMAL[type_]).replace(
        f'"{first}": "'.encode(), f'"{first}": "'.encode() + bad, 1)
    assert bad in payload
    error = reject(payload, type_)
    assert error.reason == "not_json"
    assert "UTF-8" in error.detail


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_trailing_garbage_is_not_json(type_: type[msgspec.Struct]) -> None:
    error = reject(dumps(MINIMAL[type_]) + b" trailing", type_)
    assert error.reason == "not_json"
    assert "trailing" in error.detail


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_size_limit_boundary(type_: type[msgspec.Struct]) -> None:
    limit = MAX_BYTES[type_]
    assert reject(b" " * limit, type_).reason == "not_json"  # at the limit: parsed
    error = reject(b" " * (limit + 1), type_)
    assert error.reason == "too_large"
    assert str(limit) in error.detail
    assert type_.__name__ in error.detail


def test_memoryview_size_is_counted_in_bytes() -> None:
    limit = MAX_BYTES[Status]
    wide = memoryview(bytes(limit + 4)).cast("I")  # limit/4 + 1 items, limit + 4 bytes
    assert reject(wide, Status).reason == "too_large"


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_oversize_is_rejected_before_parsing(type_: type[msgspec.Struct]) -> None:
    # 10 MB of valid, deeply repetitive JSON: parsing it would take tens of milliseconds.
    big = b'{"pad": [' + b"1," * (5 << 20) + b'1]}'
    assert len(big) > 10 << 20
    start = time.perf_counter()
    for _ in range(20):
        assert reject(big, type_).reason == "too_large"
    assert (time.perf_counter() - start) / 20 < 0.002


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("version", [0, 2, 99, -1])
def test_other_versions_are_unsupported(type_: type[msgspec.Struct], version: int) -> None:
    error = reject(dumps({**MINIMAL[type_], "v": version}), type_)
    assert error.reason == "unsupported_version"
    assert f"v={version}" in error.detail


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_newer_version_with_other_schema_is_unsupported_not_schema(
    type_: type[msgspec.Struct],
) -> None:
    # A v2 message whose fields changed shape is a version problem, not a malformed v1 one.
    required = next(iter(MINIMAL[type_]))
    payload = {k: v for k, v in MINIMAL[type_].items() if k != required}
    error = reject(dumps({**payload, "v": 2, required: {"changed": True}}), type_)
    assert error.reason == "unsupported_version"
    error = reject(dumps({**payload, "v": 1}), type_)
    assert error.reason == "schema"


@pytest.mark.parametrize("version", ["1", 1.0, None, True, [1]])
def test_version_of_wrong_type_is_schema(version: Any) -> None:
    error = reject(dumps({**MINIMAL[Telemetry], "v": version}), Telemetry)
    assert error.reason == "schema"
    assert "$.v" in error.detail


def test_explicit_current_version_decodes() -> None:
    payload = dumps({**MINIMAL[Event], "v": SCHEMA_VERSION})
    assert decode(payload, Event).v == SCHEMA_VERSION


def test_decode_error_shape() -> None:
    error = reject(b"{", Status)
    assert isinstance(error, ValueError)
    assert str(error).startswith("not_json: ")
    assert error.detail in str(error)


# --- nesting -------------------------------------------------------------------------------


def _nest(depth: int, opener: bytes = b"[") -> bytes:
    return opener * depth


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_deeply_nested_json_is_a_decode_error(type_: type[msgspec.Struct]) -> None:
    depth = min(100_000, MAX_BYTES[type_] - 200)
    minimal = dumps(MINIMAL[type_])[:-1]
    payloads = [
        _nest(100_000),  # top level (over the limit for the small types: too_large)
        _nest(depth),
        minimal + b', "unknown": ' + _nest(depth),  # skipped unknown field
        minimal + b', "unknown": ' + _nest(depth // 5, b'{"a":'),
        b'{"v": ' + _nest(depth),
    ]
    # Fields typed Any or a JSON container.
    for field in ("body", "detail", "data", "labels", "gpus", "metrics"):
        payloads.append(minimal + f', "{field}": '.encode() + _nest(depth))
        payloads.append(minimal + f', "{field}": {{"x": '.encode() + _nest(depth))
        payloads.append(minimal + f', "{field}": {{"x": '.encode() + _nest(depth) + b"]" * depth
                        + b"}}")
    for payload in payloads:
        reject(payload, type_)


def test_moderate_nesting_in_any_fields_is_fine() -> None:
    body: Any = "leaf"
    for _ in range(50):
        body = {"x": [body]}
    command = Command(id="c", kind="sync", issued_at=1.0, expires_at=2.0, key_id="k",
                      body={"deep": body})
    assert decode(encode(command), Command) == command
