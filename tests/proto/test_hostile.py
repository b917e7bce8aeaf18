"""Hostile payloads: whatever arrives on a topic, ``decode`` answers with a message or a
:class:`DecodeError` carrying a known reason, never another exception."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_ops_helper.proto import DecodeError, Telemetry, decode, encode
from llm_ops_helper.proto.codec import MAX_BYTES, REASONS
from tests.proto import MESSAGE_TYPES, MINIMAL, SAMPLES

HOSTILE = settings(max_examples=200, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TYPE_IDS = [t.__name__ for t in MESSAGE_TYPES]


def check(payload: bytes, type_: type[msgspec.Struct]) -> msgspec.Struct | None:
    """Decode, allowing only success or a DecodeError with a known reason and a detail."""
    try:
        message = decode(payload, type_)
    except DecodeError as exc:
        assert exc.reason in REASONS
        assert exc.detail
        return None
    assert type(message) is type_
    # What decodes must be a value we can send on again unchanged.
    assert decode(encode(message), type_) == message
    return message


def check_all(payload: bytes) -> None:
    """A payload may arrive on any topic: check it against every payload type."""
    for type_ in MESSAGE_TYPES:
        check(payload, type_)


# Any JSON the stdlib writes, including what msgspec refuses (huge ints, NaN, Infinity).
ANY_JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=10,
)


@settings(HOSTILE, max_examples=400)
@given(payload=st.binary(max_size=600))
def test_arbitrary_bytes(payload: bytes) -> None:
    check_all(payload)


@settings(HOSTILE, max_examples=300)
@given(value=ANY_JSON)
def test_arbitrary_json_values(value: Any) -> None:
    check_all(json.dumps(value).encode())


def _field_values(type_: type[msgspec.Struct]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the type's own field names (and ``v``) holding arbitrary JSON."""
    names = [f.encode_name for f in msgspec.structs.fields(type_)]
    return st.dictionaries(st.sampled_from(names) | st.text(max_size=5), ANY_JSON,
                           min_size=1, max_size=3)


@settings(HOSTILE, max_examples=250)
@given(type_=st.sampled_from(MESSAGE_TYPES), data=st.data())
def test_arbitrary_json_in_known_fields(type_: type[msgspec.Struct], data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([MINIMAL[type_]]
                                     + [msgspec.to_builtins(m) for m in SAMPLES[type_]]))
    check_all(json.dumps({**base, **data.draw(_field_values(type_))}).encode())


# --- mutations of valid messages -----------------------------------------------------------


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, (*path, index))
    return found


def _replace(node: Any, path: tuple[Any, ...], op: str, new: Any) -> Any:
    if not path:
        return new if op != "delete" else None
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        node = dict(node)
        if not rest and op == "delete":
            del node[head]
        else:
            node[head] = _replace(node[head], rest, op, new)
    else:
        node = list(node)
        if not rest and op == "delete":
            del node[head]
        else:
            node[head] = _replace(node[head], rest, op, new)
    return node


def _swap_type(value: Any) -> list[Any]:
    """Values of another JSON type than ``value``'s."""
    return [v for v in (None, True, 0, -1, 2**64, 1.5, "", "1", [], [value], {}, {"x": value})
            if type(v) is not type(value)]


@st.composite
def mutated_payloads(draw: st.DrawFn, type_: type[msgspec.Struct]) -> bytes:
    payload = encode(draw(st.sampled_from(SAMPLES[type_])))
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "cut", "delete_field", "swap"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(payload) - 1))
            payload = payload[:i] + bytes([payload[i] ^ draw(st.integers(1, 255))]) + payload[i + 1:]
        return payload
    if kind == "truncate":
        return payload[:draw(st.integers(0, len(payload) - 1))]
    if kind == "insert":
        i = draw(st.integers(0, len(payload)))
        return payload[:i] + draw(st.binary(min_size=1, max_size=8)) + payload[i:]
    if kind == "cut":
        i = draw(st.integers(0, len(payload) - 1))
        return payload[:i] + payload[i + draw(st.integers(1, 8)):]
    document = json.loads(payload)
    path = draw(st.sampled_from(_paths(document)[1:]))
    if kind == "delete_field":
        return json.dumps(_replace(document, path, "delete", None)).encode()
    node = document
    for step in path:
        node = node[step]
    new = draw(st.sampled_from(_swap_type(node)))
    return json.dumps(_replace(document, path, "set", new)).encode()


@settings(HOSTILE, max_examples=400)
@given(type_=st.sampled_from(MESSAGE_TYPES), data=st.data())
def test_mutated_valid_messages(type_: type[msgspec.Struct], data: st.DataObject) -> None:
    # Checked against every type: a payload on the wrong topic must be refused just as cleanly.
    check_all(data.draw(mutated_payloads(type_)))


def test_field_deletion_and_type_swap_are_schema_errors() -> None:
    # Deterministic anchors for the property above: these mutations must be rejected, and
    # with the reason that names the field.
    payload = json.loads(encode(SAMPLES[Telemetry][0]))
    del payload["seq"]
    with pytest.raises(DecodeError) as info:
        decode(json.dumps(payload).encode(), Telemetry)
    assert info.value.reason == "schema"
    assert "`seq`" in info.value.detail
    payload["seq"] = [1]
    with pytest.raises(DecodeError) as info:
        decode(json.dumps(payload).encode(), Telemetry)
    assert info.value.reason == "schema"
    assert "$.seq" in info.value.detail


# --- nesting -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(type_=st.sampled_from(MESSAGE_TYPES), data=st.data())
def test_deep_nesting_anywhere(type_: type[msgspec.Struct], data: st.DataObject) -> None:
    payload = encode(data.draw(st.sampled_from(SAMPLES[type_])))
    depth = data.draw(st.integers(500, min(100_000, MAX_BYTES[type_] - len(payload))))
    opener = data.draw(st.sampled_from([b"[", b'{"a":', b'[{"b":']))
    i = data.draw(st.integers(0, len(payload)))
    hostile = payload[:i] + opener * (depth // len(opener)) + payload[i:]
    check_all(hostile)


@pytest.mark.parametrize("type_", MESSAGE_TYPES, ids=TYPE_IDS)
def test_hundred_thousand_brackets(type_: type[msgspec.Struct]) -> None:
    for payload in (b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"x":' * 20_000):
        with pytest.raises(DecodeError) as info:
            decode(payload, type_)
        assert info.value.reason in REASONS


@pytest.mark.parametrize(("type_", "body", "field"), [
    ("StopReplica", {"name": "r", "timeout_s": 1e12}, "timeout_s"),
    ("StopReplica", {"name": "r", "timeout_s": -1}, "timeout_s"),
    ("ReplicaSpec", {"crash_loop_window_s": 0}, "crash_loop_window_s"),
    ("ReplicaSpec", {"crash_loop_restarts": -1}, "crash_loop_restarts"),
    ("ReplicaSpec", {"ready_timeout_s": -5}, "ready_timeout_s"),
    ("ReplicaSpec", {"drain_timeout_s": 1e9}, "drain_timeout_s"),
    ("ArtifactRef", {"sha256": "../../etc/passwd"}, "sha256"),
    ("EvictArtifact", {"sha256": "A" * 64}, "sha256"),
])
def test_out_of_bounds_command_fields_are_refused_by_name(type_: str, body: dict[str, Any],
                                                          field: str) -> None:
    from llm_ops_helper.proto import messages

    base: dict[str, Any] = {
        "StopReplica": {"name": "r"},
        "ReplicaSpec": {"name": "r", "deployment": "d", "version": "v", "runtime": "test"},
        "ArtifactRef": {"sha256": "a" * 64, "size_bytes": 1, "url": "http://h/a"},
        "EvictArtifact": {"sha256": "a" * 64},
    }[type_]
    cls = getattr(messages, type_)
    msgspec.convert(base, cls)  # the base is fine
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.convert({**base, **body}, cls)


def test_stop_replica_without_timeout_defers_to_the_spec() -> None:
    from llm_ops_helper.proto.messages import StopReplica

    assert msgspec.convert({"name": "r"}, StopReplica).timeout_s is None
    assert msgspec.convert({"name": "r", "timeout_s": 5}, StopReplica).timeout_s == 5
