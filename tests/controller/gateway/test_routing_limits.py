"""The pure parts: the replica pick, the token buckets, the prompt estimate."""

from __future__ import annotations

from llm_ops_helper.controller.gateway.config import KeyConfig
from llm_ops_helper.controller.gateway.limits import (
    KeyLimits,
    TokenBucket,
    estimate_prompt_tokens,
)
from llm_ops_helper.controller.gateway.routing import Replica, pick

KEY = "0" * 64


def test_pick_fewest_in_flight_then_in_turn() -> None:
    a, b, c = Replica("a", "u", "v"), Replica("b", "u", "v"), Replica("c", "u", "v")
    a.in_flight, b.in_flight, c.in_flight = 2, 1, 1
    assert [pick([a, b, c], 0.0, turn) for turn in range(4)] == [b, c, b, c]
    assert pick([a, b, c], 0.0, 0, exclude=frozenset({"b", "c"})) is a
    assert pick([], 0.0, 0) is None


def test_suspect_replicas_only_when_nothing_else() -> None:
    a, b = Replica("a", "u", "v"), Replica("b", "u", "v")
    a.suspect_until = 10.0
    b.in_flight = 5
    assert pick([a, b], 5.0, 0) is b
    assert pick([a, b], 11.0, 0) is a  # suspicion lapses
    assert pick([a], 5.0, 0) is a


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(60, now=0.0)  # one a second
    assert bucket.wait_s(60, 0.0) == 0
    bucket.take(60)
    assert bucket.wait_s(1, 0.0) == 1.0
    assert bucket.wait_s(1, 0.5) == 0.5
    assert bucket.wait_s(1, 1.0) == 0
    assert bucket.wait_s(1000, 1.0) == 59.0  # more than the capacity counts as the capacity


def test_key_limits_admit_refuse_and_settle() -> None:
    limits = KeyLimits(KeyConfig(name="k", sha256=KEY, rpm=2, tpm=100), now=0.0)
    assert limits.admit(50, 0.0) is None
    limits.settle(50, 10)  # used 10 of the 50 charged: 40 back
    assert limits.admit(90, 0.0) is None
    refusal = limits.admit(1, 0.0)
    assert refusal is not None and refusal.status == 429
    assert refusal.retry_after_s == 30  # rpm 2: a request every 30 s
    assert limits.admit(1, 30.0) is None


def test_size_caps() -> None:
    limits = KeyLimits(KeyConfig(name="k", sha256=KEY, max_prompt_tokens=10,
                                 max_completion_tokens=5), now=0.0)
    assert limits.check_sizes(10, 5) is None
    assert limits.check_sizes(10, None) is None
    refusal = limits.check_sizes(11, 1)
    assert refusal is not None and refusal.code == "context_length_exceeded"
    refusal = limits.check_sizes(1, 6)
    assert refusal is not None and refusal.code == "max_tokens_exceeded"


def test_prompt_estimate_counts_chat_and_completion_text() -> None:
    assert estimate_prompt_tokens({"messages": [{"content": "abcd" * 3},
                                                {"content": [{"type": "text",
                                                              "text": "abcd"}]}]}) == 4
    assert estimate_prompt_tokens({"prompt": "abcde"}) == 2
    assert estimate_prompt_tokens({"prompt": ["ab", "cd"]}) == 1
    assert estimate_prompt_tokens({}) == 0
