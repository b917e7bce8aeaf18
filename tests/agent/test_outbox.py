from __future__ import annotations

from llm_ops_helper.agent.outbox import Outbox, Outgoing
from llm_ops_helper.backoff import backoff_delay


def _t(n: int) -> Outgoing:
    return Outgoing("llmops/v1/agents/a/telemetry", str(n).encode())


def test_full_lane_drops_oldest_and_counts() -> None:
    box = Outbox(telemetry_capacity=3)
    for n in range(5):
        box.put_telemetry(_t(n))
    assert [m.payload for m in box.head(10)] == [b"2", b"3", b"4"]
    assert box.dropped == 2


def test_urgent_lane_goes_first_and_done_forgets_only_what_was_sent() -> None:
    box = Outbox(telemetry_capacity=10)
    box.put_telemetry(_t(1))
    event = Outgoing("llmops/v1/agents/a/events", b"xid")
    box.put_urgent(event)
    assert box.head(5) == [event]
    box.done([event])
    batch = box.head(5)
    assert batch == [_t(1)] and len(box) == 1
    box.put_telemetry(_t(2))
    box.done(batch)
    assert box.head(5) == [_t(2)]


def test_done_ignores_messages_a_full_lane_already_dropped() -> None:
    box = Outbox(telemetry_capacity=2)
    box.put_telemetry(_t(1))
    box.put_telemetry(_t(2))
    batch = box.head(2)
    box.put_telemetry(_t(3))  # drops 1 while 1 and 2 are in flight
    box.done(batch)
    assert [m.payload for m in box.head(5)] == [b"3"]


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    assert backoff_delay(0, 0.5, 10, rand=lambda: 0.0) == 0.25
    assert backoff_delay(0, 0.5, 10, rand=lambda: 1.0) == 0.5
    assert backoff_delay(3, 0.5, 10, rand=lambda: 1.0) == 4.0
    assert backoff_delay(50, 0.5, 10, rand=lambda: 1.0) == 10.0
    assert 5.0 <= backoff_delay(50, 0.5, 10) <= 10.0


def test_a_message_evicted_while_in_flight_counts_as_dropped_only_if_its_publish_fails() -> None:
    box = Outbox(telemetry_capacity=2)
    box.put_telemetry(_t(1))
    box.put_telemetry(_t(2))
    batch = box.head(2)
    box.put_telemetry(_t(3))  # evicts 1, which is being published
    box.done(batch)           # ... and the broker acknowledged it: it arrived
    assert box.dropped == 0

    box.put_telemetry(_t(4))
    batch = box.head(2)       # 3 and 4 in flight
    box.put_telemetry(_t(5))  # evicts 3
    box.failed()              # the connection dropped before the acknowledgement
    assert box.dropped == 1
    assert [m.payload for m in box.head(5)] == [b"4", b"5"]
