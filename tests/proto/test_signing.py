"""Command signing: what verifies, and the specific reason for everything that must not."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_ops_helper.proto import (
    Command,
    CommandKind,
    CommandRejected,
    CommandVerifier,
    decode,
    encode,
    sign_command,
)
from llm_ops_helper.proto.signing import REJECT_REASONS, canonical_bytes, signature
from tests.proto import FINITE_FLOATS, JSON_OBJECTS, JSON_VALUES, SHORT_TEXT

NOW = 1_732_850_000.123456
KEY_A, SECRET_A = "key-2024", b"\x01" * 32
KEY_B, SECRET_B = "key-2025", b"\x02" * 32


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_verifier(clock: Clock | None = None, **kwargs: Any) -> CommandVerifier:
    return CommandVerifier({KEY_A: SECRET_A}, clock=clock or Clock(), **kwargs)


def make_command(command_id: str = "cmd-1", *, kind: str = CommandKind.DEPLOY_REPLICA,
                 body: dict[str, Any] | None = None, key_id: str = KEY_A,
                 secret: bytes = SECRET_A, ttl_s: float = 60.0, now: float = NOW) -> Command:
    return sign_command(kind, body if body is not None else {"name": "r1", "gpus": [0, 1]},
                        key_id=key_id, secret=secret, command_id=command_id, ttl_s=ttl_s,
                        now=now)


def rejected(verifier: CommandVerifier, command: Command) -> CommandRejected:
    with pytest.raises(CommandRejected) as info:
        verifier.verify(command)
    assert info.value.reason in REJECT_REASONS
    assert str(info.value).startswith(f"{info.value.reason}: ")
    return info.value


# --- the happy paths -----------------------------------------------------------------------


def test_sign_verify_round_trip() -> None:
    command = make_command()
    assert command.issued_at == NOW
    assert command.expires_at == NOW + 60.0
    assert command.key_id == KEY_A
    assert len(command.sig) == 64
    int(command.sig, 16)
    make_verifier().verify(command)


def test_sign_uses_the_wall_clock_by_default() -> None:
    import time

    command = sign_command("sync", {}, key_id=KEY_A, secret=SECRET_A, command_id="c")
    assert abs(command.issued_at - time.time()) < 5
    CommandVerifier({KEY_A: SECRET_A}).verify(command)


def test_signature_covers_canonical_bytes_not_key_order() -> None:
    one = make_command(body={"a": 1, "b": {"y": 2, "x": 3}})
    two = make_command(body={"b": {"x": 3, "y": 2}, "a": 1})
    assert canonical_bytes(one) == canonical_bytes(two)
    assert one.sig == two.sig
    assert b'"sig"' not in canonical_bytes(one)
    # The canonical bytes are independent of sig.
    assert canonical_bytes(msgspec.structs.replace(one, sig="x")) == canonical_bytes(one)


def test_wire_round_trip_then_verify() -> None:
    # Float timestamps with many digits must survive JSON exactly, or the signature breaks.
    command = make_command(body={"name": "r1", "ratio": 0.1 + 0.2, "n": 2**53 + 1,
                                 "neg": -0.0, "nested": {"list": [1.5, None, True, "é"]}},
                           now=1_732_850_000.1 + 1e-7, ttl_s=0.3)
    payload = encode(command)
    decoded = decode(payload, Command)
    assert decoded == command
    assert decoded.issued_at == command.issued_at
    make_verifier(Clock(command.issued_at)).verify(decoded)


def test_two_keys_verify_during_rotation() -> None:
    verifier = CommandVerifier({KEY_A: SECRET_A, KEY_B: SECRET_B}, clock=Clock())
    verifier.verify(make_command("old", key_id=KEY_A, secret=SECRET_A))
    verifier.verify(make_command("new", key_id=KEY_B, secret=SECRET_B))
    # Each key only verifies its own signatures.
    crossed = make_command("crossed", key_id=KEY_B, secret=SECRET_A)
    assert rejected(verifier, crossed).reason == "bad_signature"


def test_lifetime_exactly_at_the_cap_is_accepted() -> None:
    verifier = make_verifier(max_lifetime_s=600.0)
    for i, now in enumerate([NOW, 1_700_000_000.123, 0.3, 1e9 + 0.7]):
        verifier.clock = Clock(now)
        verifier.verify(make_command(f"c{i}", ttl_s=600.0, now=now))
    # (issued + ttl) - issued can round above ttl; a ttl of exactly the cap must still pass.
    for i, (now, ttl) in enumerate([(1_793_871_493.3553886, 0.7), (1_743_148_744.6932764, 59.9)]):
        assert (now + ttl) - now > ttl
        verifier = make_verifier(Clock(now), max_lifetime_s=ttl)
        verifier.verify(make_command(f"r{i}", ttl_s=ttl, now=now))


# --- rejections ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("body", {"name": "r2", "gpus": [0, 1]}),
        ("body", {"name": "r1", "gpus": [0, 1], "extra": None}),
        ("body", {"name": "r1", "gpus": [1, 0]}),
        ("body", {"name": "r1", "gpus": [0, 1.0]}),
        ("body", {}),
        ("kind", CommandKind.STOP_REPLICA.value),
        ("id", "cmd-2"),
        ("issued_at", NOW - 1.0),
        ("issued_at", math.nextafter(NOW, 0.0)),
        ("expires_at", NOW + 61.0),
        ("expires_at", math.nextafter(NOW + 60.0, math.inf)),
        ("v", 2),
    ],
)
def test_tampered_field_is_bad_signature(field: str, value: Any) -> None:
    command = msgspec.structs.replace(make_command(), **{field: value})
    assert rejected(make_verifier(), command).reason == "bad_signature"


def test_key_id_changed_to_another_known_key_is_bad_signature() -> None:
    verifier = CommandVerifier({KEY_A: SECRET_A, KEY_B: SECRET_B}, clock=Clock())
    command = msgspec.structs.replace(make_command(), key_id=KEY_B)
    assert rejected(verifier, command).reason == "bad_signature"


def test_key_id_changed_to_unknown_key() -> None:
    command = msgspec.structs.replace(make_command(), key_id="key-1999")
    error = rejected(make_verifier(), command)
    assert error.reason == "unknown_key"
    assert "key-1999" in error.detail


def test_wrong_secret_is_bad_signature() -> None:
    command = make_command(secret=b"not the agent's secret")
    assert rejected(make_verifier(), command).reason == "bad_signature"


@pytest.mark.parametrize(
    "sig",
    ["0" * 64, "", "A" * 64, "zz", "é" * 64, "\u2603", "\ud800", "x" * 10_000],
)
def test_forged_signatures(sig: str) -> None:
    command = msgspec.structs.replace(make_command(), sig=sig)
    reason = rejected(make_verifier(), command).reason
    assert reason == ("unsigned" if sig == "" else "bad_signature")


def test_signature_in_upper_case_is_refused() -> None:
    command = make_command()
    upper = msgspec.structs.replace(command, sig=command.sig.upper())
    assert rejected(make_verifier(), upper).reason == "bad_signature"


def test_unsigned() -> None:
    command = Command(id="c", kind="sync", issued_at=NOW, expires_at=NOW + 1, key_id=KEY_A)
    assert rejected(make_verifier(), command).reason == "unsigned"


def test_expired_with_injected_clock() -> None:
    clock = Clock()
    verifier = make_verifier(clock, clock_skew_s=30.0)
    command = make_command(ttl_s=60.0)
    clock.now = NOW + 60.0 + 30.0  # at the edge of the skew: still accepted
    verifier.verify(command)
    clock.now = NOW + 60.0 + 30.001
    error = rejected(verifier, make_command("cmd-2", ttl_s=60.0))
    assert error.reason == "expired"
    assert "cmd-2" in error.detail


def test_issued_in_the_future_beyond_skew() -> None:
    clock = Clock()
    verifier = make_verifier(clock, clock_skew_s=30.0)
    verifier.verify(make_command("edge", now=NOW + 30.0))  # within skew
    error = rejected(verifier, make_command("ahead", now=NOW + 30.5))
    assert error.reason == "not_yet_valid"
    assert "ahead" in error.detail


def test_lifetime_over_the_cap() -> None:
    verifier = make_verifier(max_lifetime_s=600.0)
    error = rejected(verifier, make_command(ttl_s=600.5))
    assert error.reason == "lifetime_too_long"
    assert "600" in error.detail


def test_lifetime_checked_even_when_signed() -> None:
    # A correctly signed command that lives a day is refused, however fresh.
    command = make_command(ttl_s=86_400.0)
    assert rejected(make_verifier(), command).reason == "lifetime_too_long"


@pytest.mark.parametrize(
    ("issued_at", "expires_at"),
    [(math.nan, NOW + 60), (NOW, math.nan), (math.nan, math.nan), (math.inf, math.inf),
     (-math.inf, -math.inf), (-math.inf, NOW), (NOW, math.inf)],
)
def test_non_finite_timestamps_never_verify(issued_at: float, expires_at: float) -> None:
    unsigned = Command(id="c", kind="sync", issued_at=issued_at, expires_at=expires_at,
                       key_id=KEY_A)
    command = msgspec.structs.replace(unsigned, sig=signature(unsigned, SECRET_A))
    assert rejected(make_verifier(), command).reason in {
        "lifetime_too_long", "expired", "not_yet_valid"}


def test_same_id_twice_is_replayed() -> None:
    verifier = make_verifier()
    command = make_command()
    verifier.verify(command)
    error = rejected(verifier, command)
    assert error.reason == "replayed"
    assert "cmd-1" in error.detail
    # Even re-signed with a new body and fresh times, the id stays spent.
    assert rejected(verifier, make_command(body={"other": True}, now=NOW + 1)).reason == "replayed"


def test_rejected_commands_do_not_spend_their_id() -> None:
    clock = Clock()
    verifier = make_verifier(clock)
    assert rejected(verifier, make_command(now=NOW + 100)).reason == "not_yet_valid"
    verifier.verify(make_command())


def test_replay_cache_prunes_expired_ids() -> None:
    clock = Clock()
    verifier = make_verifier(clock, max_cached_ids=3, clock_skew_s=30.0)
    for i in range(3):
        verifier.verify(make_command(f"old-{i}", ttl_s=10.0))
    clock.now = NOW + 10.0 + 30.0 + 1  # all three are past expiry plus skew
    verifier.verify(make_command("new-0", ttl_s=10.0, now=clock.now))
    assert set(verifier._seen) == {"new-0"}
    # A pruned id could only come back expired, never replayed into acceptance.
    assert rejected(verifier, make_command("old-0", ttl_s=10.0)).reason == "expired"


def test_replay_cache_full_of_unexpired_ids_refuses() -> None:
    clock = Clock()
    verifier = make_verifier(clock, max_cached_ids=3)
    for i in range(3):
        verifier.verify(make_command(f"c{i}"))
    error = rejected(verifier, make_command("c3"))
    assert error.reason == "replay_cache_full"
    assert "3" in error.detail
    # The cache did not forget anything to make room.
    assert rejected(verifier, make_command("c0")).reason == "replayed"
    # Once one has expired, there is room again.
    clock.now = NOW + 60.0 + 30.0 + 1
    verifier.verify(make_command("c4", now=clock.now))


def test_replay_cache_keeps_ids_within_skew_after_expiry() -> None:
    clock = Clock()
    verifier = make_verifier(clock, max_cached_ids=1, clock_skew_s=30.0)
    verifier.verify(make_command("a", ttl_s=10.0))
    clock.now = NOW + 10.0 + 20.0  # expired, but still acceptable within skew: must be kept
    assert rejected(verifier, make_command("b", ttl_s=10.0, now=clock.now)).reason == (
        "replay_cache_full")
    assert rejected(verifier, make_command("a", ttl_s=10.0)).reason == "replayed"


# --- properties ----------------------------------------------------------------------------

_FIELDS = ("id", "kind", "issued_at", "expires_at", "key_id", "body", "v")


def _changed(command: Command, field: str, data: st.DataObject) -> Command:
    draw = data.draw
    current = getattr(command, field)
    if field in ("id", "kind", "key_id"):
        value: Any = draw(SHORT_TEXT.filter(lambda s: s != current))
    elif field in ("issued_at", "expires_at"):
        value = draw(st.sampled_from([math.nextafter(current, math.inf),
                                      math.nextafter(current, -math.inf), current + 1.0,
                                      current - 1.0]))
    elif field == "v":
        value = draw(st.integers().filter(lambda v: v != current))
    else:
        key = draw(SHORT_TEXT)
        if key in current:  # drop it, or give it another value
            value = draw(st.sampled_from([
                {k: v for k, v in current.items() if k != key},
                {**current, key: [current[key]]},
            ]))
        else:
            value = {**current, key: draw(JSON_VALUES)}
    return msgspec.structs.replace(command, **{field: value})


@settings(max_examples=150, deadline=None)
@given(body=JSON_OBJECTS, kind=SHORT_TEXT, command_id=SHORT_TEXT,
       now=FINITE_FLOATS.filter(lambda x: abs(x) < 1e15),
       ttl=st.floats(min_value=0.0, max_value=600.0))
def test_sign_then_verify_property(body: dict[str, Any], kind: str, command_id: str,
                                   now: float, ttl: float) -> None:
    command = sign_command(kind, body, key_id=KEY_A, secret=SECRET_A, command_id=command_id,
                           ttl_s=ttl, now=now)
    make_verifier(Clock(now)).verify(command)
    # And after a trip over the wire.
    make_verifier(Clock(now)).verify(decode(encode(command), Command))


@settings(max_examples=150, deadline=None)
@given(body=JSON_OBJECTS, field=st.sampled_from(_FIELDS), data=st.data())
def test_any_single_field_change_fails(body: dict[str, Any], field: str,
                                       data: st.DataObject) -> None:
    command = make_command(body=body)
    changed = _changed(command, field, data)
    verifier = CommandVerifier({KEY_A: SECRET_A, KEY_B: SECRET_B}, clock=Clock())
    reason = rejected(verifier, changed).reason
    if field == "key_id" and changed.key_id not in (KEY_A, KEY_B):
        assert reason == "unknown_key"
    else:
        assert reason == "bad_signature"
    verifier.verify(command)  # the original still verifies
