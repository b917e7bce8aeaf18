"""Ingest: every message lands or is dropped with a counted reason; a flood costs others nothing."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from llm_ops_helper.controller.alerts import AlertManager
from llm_ops_helper.controller.config import FleetConfig, RulesConfig
from llm_ops_helper.controller.fleet import Fleet
from llm_ops_helper.controller.ingest import LOST_AFTER_RECONNECT_S, LOST_CONFIRM_S, Ingest
from llm_ops_helper.controller.store import Store
from llm_ops_helper.proto.codec import encode
from llm_ops_helper.proto.messages import Alert, Event
from tests.controller.fixtures import gpu, status, telemetry

TOPIC = "llmops/v1/agents/{}/{}"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ingest(tmp_path: Path) -> Ingest:
    clock = Clock()
    sent: list[Alert] = []
    alerts = AlertManager(Store(tmp_path / "c.db"), [sent.extend])
    ing = Ingest(Fleet(), alerts, None, FleetConfig(max_messages_per_s=5.0, burst=10),
                 RulesConfig(), monotonic=clock, wall=lambda: 1000.0 + clock.t)
    ing.clock = clock  # type: ignore[attr-defined]
    ing.sent = sent  # type: ignore[attr-defined]
    return ing


def send(ingest: Ingest, host: str, kind: str, payload: bytes | msgspec.Struct) -> None:
    ingest.handle(TOPIC.format(host, kind),
                  payload if isinstance(payload, bytes) else encode(payload))
    ingest.alerts.commit()


def test_good_telemetry_updates_the_fleet_and_rules(ingest: Ingest) -> None:
    send(ingest, "h1", "telemetry", telemetry(gpus=[gpu(0, temperature_c=95.0)]))
    assert ingest.stats.messages["telemetry"] == 1 and ingest.fleet.hosts["h1"].online
    assert [a.rule for a in ingest.sent] == ["gpu_temperature_high"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("llmops/v1/agents/h1/telemetry", b"{not json", "not_json"),
    ("llmops/v1/agents/h1/telemetry", b'{"host": "h1", "seq": "x"}', "schema"),
    ("llmops/v1/agents/h1/telemetry", b'{"v": 9, "host": "h1", "seq": "x"}',
     "unsupported_version"),
    ("llmops/v1/agents/h1/telemetry", b"[" * 5_000_000, "too_large"),
    ("llmops/v1/agents/h1/bogus", b"{}", "bad_topic"),
    ("llmops/v1/agents/h+1/telemetry", b"{}", "bad_topic"),
    ("elsewhere/h1/telemetry", b"{}", "bad_topic"),
])
def test_bad_messages_are_dropped_with_their_reason(ingest: Ingest, topic: str,
                                                    payload: bytes, reason: str) -> None:
    ingest.handle(topic, payload)
    assert dict(ingest.stats.dropped) == {reason: 1}
    assert ingest.fleet.hosts == {}


def test_a_payload_claiming_another_host_is_dropped(ingest: Ingest) -> None:
    send(ingest, "h1", "telemetry", telemetry(host="h2"))
    send(ingest, "h1", "status", status(host="h2"))
    send(ingest, "h1", "events", Event(host="h2", ts=1.0, kind="xid", data={"xid": 79}))
    assert ingest.stats.dropped["host_mismatch"] == 3 and ingest.fleet.hosts == {}


def test_duplicates_are_dropped_and_counted(ingest: Ingest) -> None:
    send(ingest, "h1", "telemetry", telemetry(seq=1))
    send(ingest, "h1", "telemetry", telemetry(seq=1))
    assert ingest.stats.dropped["duplicate"] == 1 and ingest.stats.messages["telemetry"] == 1


def test_a_flood_from_one_host_is_rate_limited_and_the_others_are_untouched(
        ingest: Ingest) -> None:
    clock = ingest.clock  # type: ignore[attr-defined]
    for second in range(10):
        clock.t = float(second)
        for n in range(1000):
            send(ingest, "noisy", "telemetry", telemetry(host="noisy", seq=second * 1000 + n + 1))
        send(ingest, "quiet", "telemetry", telemetry(host="quiet", seq=second + 1))
    # The burst, then the configured rate; everything else counted as rate_limited.
    assert ingest.fleet.hosts["noisy"].messages == 10 + 9 * 5
    assert ingest.stats.dropped["rate_limited"] == 10_000 - (10 + 9 * 5)
    assert ingest.fleet.hosts["quiet"].messages == 10
    assert ingest.fleet.seq.missing("quiet") == 0


def test_lost_host_alerts_and_comes_back(ingest: Ingest) -> None:
    send(ingest, "h1", "status", status())
    send(ingest, "h1", "status", status(state="offline", reason="lost"))
    assert ingest.sent == [] and not ingest.fleet.hosts["h1"].online  # type: ignore[attr-defined]
    ingest.clock.t += LOST_CONFIRM_S  # type: ignore[attr-defined]
    ingest.sweep()
    assert [(a.rule, a.state) for a in ingest.sent] == [  # type: ignore[attr-defined]
        ("host_offline", "firing")]
    send(ingest, "h1", "telemetry", telemetry())
    assert [(a.rule, a.state) for a in ingest.sent][-1] == (  # type: ignore[attr-defined]
        "host_offline", "resolved")


def test_a_silent_host_goes_stale_in_the_sweep(ingest: Ingest) -> None:
    send(ingest, "h1", "telemetry", telemetry())
    ingest.clock.t = 3.5  # type: ignore[attr-defined]
    ingest.sweep()
    assert not ingest.fleet.hosts["h1"].online
    assert ingest.fleet.hosts["h1"].offline_reason == "stale"
    assert ingest.sent[-1].rule == "host_offline"  # type: ignore[attr-defined]


def test_a_critical_xid_event_holds_an_alert_until_it_expires(ingest: Ingest) -> None:
    send(ingest, "h1", "events", Event(host="h1", ts=1000.0, kind="xid", gpu=3,
                                       data={"xid": 79}, message="XID 79 on GPU 3"))
    assert ingest.sent[-1].rule == "gpu_xid"  # type: ignore[attr-defined]
    ingest.clock.t = 1000.0  # wall = 2000 > 1000 + xid_hold_s (600)
    ingest.sweep()
    assert ingest.sent[-1].state == "resolved"  # type: ignore[attr-defined]


def test_silence_is_judged_as_of_the_data_ingest_has_reached(ingest: Ingest) -> None:
    clock = ingest.clock  # type: ignore[attr-defined]
    send(ingest, "h1", "telemetry", telemetry(host="h1", ts=1000.0))
    ingest.sweep()
    # Ten seconds later ingest is still working through a backlog: h2's snapshot from 0.5 s
    # after h1's arrives now. h1 is not silent; the controller is behind.
    clock.t = 10.0
    send(ingest, "h2", "telemetry", telemetry(host="h2", ts=1000.5))
    ingest.sweep()
    assert ingest.stats.lag_s == 9.5
    assert ingest.fleet.hosts["h1"].online
    # Caught up, and h1 still says nothing while h2 does: now h1 is stale.
    clock.t = 14.0
    send(ingest, "h2", "telemetry", telemetry(host="h2", seq=2, ts=1014.0))
    ingest.sweep()
    assert ingest.stats.lag_s == 0.0
    assert not ingest.fleet.hosts["h1"].online and ingest.fleet.hosts["h2"].online


@pytest.mark.parametrize("ts", [1e12, 1e306, 1000.0 - 2 * 86_400, 1000.0 + 2 * 86_400])
def test_timestamps_far_from_the_controllers_clock_are_dropped(ingest: Ingest, ts: float) -> None:
    send(ingest, "h1", "telemetry", telemetry(ts=ts, gpus=[gpu(0, temperature_c=99.0)]))
    send(ingest, "h1", "events", Event(host="h1", ts=ts, kind="xid", data={"xid": 79}))
    send(ingest, "h1", "status", status(ts=ts))
    assert ingest.stats.dropped["bad_timestamp"] == 3
    assert ingest.fleet.hosts == {} and ingest.sent == []  # type: ignore[attr-defined]


def test_a_telemetry_flood_does_not_starve_status_and_events(ingest: Ingest) -> None:
    for n in range(500):
        send(ingest, "h1", "telemetry", telemetry(seq=n + 1))
    send(ingest, "h1", "status", status(state="offline", reason="lost"))
    send(ingest, "h1", "events", Event(host="h1", ts=1000.0, kind="xid", gpu=0,
                                       data={"xid": 79}))
    assert ingest.stats.dropped["rate_limited"] == 500 - 10
    assert ingest.stats.messages["status"] == 1 and ingest.stats.messages["events"] == 1


def test_no_host_goes_stale_while_the_controllers_own_link_is_down(ingest: Ingest) -> None:
    clock = ingest.clock  # type: ignore[attr-defined]
    link = {"up": True}
    ingest.link_up = lambda: link["up"]
    send(ingest, "h1", "telemetry", telemetry())
    link["up"] = False
    clock.t = 60.0
    ingest.sweep()
    assert ingest.fleet.hosts["h1"].online
    link["up"] = True
    clock.t = 61.0
    ingest.sweep()
    assert ingest.fleet.hosts["h1"].online  # silence counts again from the reconnect
    clock.t = 64.5
    ingest.sweep()
    assert not ingest.fleet.hosts["h1"].online


def test_a_tiny_claimed_interval_does_not_make_a_host_flap(ingest: Ingest) -> None:
    clock = ingest.clock  # type: ignore[attr-defined]
    send(ingest, "h1", "telemetry", telemetry(interval_s=0.0))
    clock.t = 1.5
    ingest.sweep()
    assert ingest.fleet.hosts["h1"].online


def test_a_host_offline_past_forget_after_is_forgotten(tmp_path: Path) -> None:
    clock = Clock()
    ing = Ingest(Fleet(), AlertManager(Store(tmp_path / "f.db")), None,
                 FleetConfig(forget_after_s=100.0), RulesConfig(), monotonic=clock,
                 wall=lambda: 1000.0 + clock.t)
    send(ing, "h1", "telemetry", telemetry())
    send(ing, "h1", "status", status(state="offline", reason="shutdown"))
    clock.t = 50.0
    ing.sweep()
    assert "h1" in ing.fleet.hosts
    clock.t = 200.0
    ing.sweep()
    assert ing.fleet.hosts == {} and ing.fleet.seq.missing("h1") == 0
    assert not [k for k in ing._buckets if k.startswith("h1")]


def test_wills_from_a_broker_restart_do_not_alert_unless_the_host_stays_away(
        ingest: Ingest) -> None:
    """A broker restarting publishes every agent's Will a moment before the controller's own
    link drops: no host_offline for the hosts that reconnect; one for a host that does not."""
    link = [True]
    ingest.link_up = lambda: link[0]
    for host in ("h1", "h2"):
        send(ingest, host, "status", status(host=host))
        send(ingest, host, "status", status(host=host, state="offline", reason="lost"))
    link[0] = False
    ingest.clock.t += 20.0  # type: ignore[attr-defined]
    ingest.sweep()
    link[0] = True
    ingest.sweep()
    ingest.clock.t += 5.0  # type: ignore[attr-defined]
    send(ingest, "h1", "status",  # reconnected
         status(host="h1", ts=1000.0 + ingest.clock.t))  # type: ignore[attr-defined]
    ingest.sweep()
    assert ingest.sent == []  # type: ignore[attr-defined]
    ingest.clock.t += LOST_AFTER_RECONNECT_S  # type: ignore[attr-defined]
    send(ingest, "h1", "telemetry", telemetry(host="h1"))  # h1 is back and talking
    ingest.sweep()
    ingest.alerts.commit()
    assert [(a.rule, a.host, a.state) for a in ingest.sent] == [  # type: ignore[attr-defined]
        ("host_offline", "h2", "firing")]


def test_wills_before_a_reconnect_too_quick_for_any_sweep_to_see_still_wait(
        ingest: Ingest) -> None:
    """The link dropped and came back between two sweeps (a broker restarted in a blink): the
    connect count says so, and the Wills that came with it wait for the hosts to reconnect."""
    connects = [1]
    ingest.link_connects = lambda: connects[0]
    ingest.sweep()
    send(ingest, "h1", "status", status(host="h1"))
    send(ingest, "h1", "status", status(host="h1", state="offline", reason="lost"))
    connects[0] = 2  # down and up again, never seen down by a sweep
    ingest.clock.t += LOST_CONFIRM_S + 1  # type: ignore[attr-defined]
    ingest.sweep()
    assert ingest.sent == []  # type: ignore[attr-defined]
    ingest.clock.t += LOST_AFTER_RECONNECT_S  # type: ignore[attr-defined]
    ingest.sweep()
    assert [(a.rule, a.host) for a in ingest.sent] == [  # type: ignore[attr-defined]
        ("host_offline", "h1")]
