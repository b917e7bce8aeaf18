"""From an MQTT message to fleet state, rules, alerts and the detectors' buffer.

:meth:`Ingest.handle` is synchronous and small: it runs once per message for thousands of hosts
a second, after aiomqtt has already spent a few hundred microseconds receiving it. Anything that
does not fit is dropped with a counted reason, never raised: ``bad_topic`` (not
``llmops/v1/agents/{host}/{kind}``), ``rate_limited`` (a host sending far more than its interval
says: a flood costs the others nothing but this check), the codec's ``too_large``, ``not_json``,
``schema``, ``unsupported_version``, ``host_mismatch`` (a payload that claims another host than
its topic), ``bad_timestamp`` (not finite, or more than a day from the controller's clock: an
agent sending milliseconds, say) and ``duplicate`` (a QoS 1 redelivery of a ``seq`` already
counted).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import structlog

from llm_ops_helper.controller.alerts import AlertManager
from llm_ops_helper.controller.anomalies import Analytics
from llm_ops_helper.controller.config import FleetConfig, RulesConfig
from llm_ops_helper.controller.fleet import Fleet, Transition
from llm_ops_helper.controller.rules import (
    Condition,
    HostRuleState,
    event_condition,
    host_offline_condition,
    telemetry_conditions,
)
from llm_ops_helper.proto import codec
from llm_ops_helper.proto.codec import DecodeError
from llm_ops_helper.proto.messages import CommandResult, Event, Status, Telemetry
from llm_ops_helper.proto.sequence import Verdict
from llm_ops_helper.proto.topics import PREFIX, TopicError, validate_host
from llm_ops_helper.proto.views import TelemetryTotals

log = structlog.get_logger("llmops.controller.ingest")

_AGENTS = f"{PREFIX}/agents/"
KINDS = ("status", "telemetry", "events", "results")
# Every reason handle() drops for: its own, and the codec's.
DROP_REASONS = ("bad_topic", "rate_limited", "too_many_hosts", *codec.REASONS, "host_mismatch",
                "bad_timestamp", "duplicate")
# Timestamps further than this from the controller's clock are refused (bad_timestamp).
MAX_CLOCK_SKEW_S = 86_400.0
# Catching up on a backlog defers staleness by at most this much (a controller clock that runs
# ahead of the agents' must not switch staleness off).
MAX_LAG_ALLOWANCE_S = 300.0
# Distinct hosts (topic names) given a rate-limit bucket; beyond, new names are dropped.
MAX_HOSTS = 100_000
# A Last Will alerts only once it has held this long: a broker restarting (`systemctl restart
# mosquitto`) publishes every client's Will a moment before the controller's own link drops.
LOST_CONFIRM_S = 2.0
# Wills that came with the controller's own outage wait this long after its link is back before
# they alert: the agents reconnect within their backoff (broker.reconnect_max_s, 10 s).
LOST_AFTER_RECONNECT_S = 30.0
# How often hosts offline past fleet.forget_after_s are looked for.
FORGET_CHECK_S = 60.0


@dataclass
class TokenBucket:
    tokens: float
    last: float


@dataclass
class IngestStats:
    messages: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    # How far behind ingest runs: the age (now - ts) of the freshest snapshot handled over the
    # last sweep interval. The minimum, so one agent with a slow clock does not count.
    lag_s: float = 0.0


class Ingest:
    def __init__(self, fleet: Fleet, alerts: AlertManager, analytics: Analytics | None,
                 fleet_config: FleetConfig, rules: RulesConfig,
                 monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.fleet = fleet
        self.alerts = alerts
        self.analytics = analytics
        self.fleet_config = fleet_config
        self.rules = rules
        self.monotonic = monotonic
        self.wall = wall
        self.stats = IngestStats()
        self._buckets: dict[str, TokenBucket] = {}
        self._rule_state: dict[str, HostRuleState] = {}
        self._logged: set[tuple[str, str]] = set()
        self._freshest: float | None = None
        # The broker link's state (the daemon sets it); staleness pauses while it is down.
        self.link_up: Callable[[], bool] = lambda: True
        # How many times the link has connected (the daemon sets it): a reconnect between two
        # sweeps is still a reconnect, however short the outage.
        self.link_connects: Callable[[], int] = lambda: 0
        self._connects_seen = 0
        # The deployment engine's hooks: replica events and command results, as they arrive.
        self.on_event: Callable[[str, Event], None] = lambda host, event: None
        self.on_result: Callable[[CommandResult], None] = lambda result: None
        self._link_was_down = False
        self._last_forget = 0.0
        # Hosts whose Last Will is waiting to be confirmed: (alert, due on the monotonic
        # clock, when the Will said it happened).
        self._lost: dict[str, tuple[Condition, float, float]] = {}

    def handle(self, topic: str, payload: bytes | bytearray) -> None:
        if not topic.startswith(_AGENTS):
            return self._drop("bad_topic", topic, "not under " + _AGENTS)
        host, _, kind = topic[len(_AGENTS):].partition("/")
        if kind not in KINDS:
            return self._drop("bad_topic", topic, f"unknown kind {kind!r}")
        try:
            validate_host(host)
        except TopicError as exc:
            return self._drop("bad_topic", topic, str(exc))
        now = self.monotonic()
        # Telemetry has a bucket of its own: a replayed backlog must not starve a host's
        # status (its Will) and events, which are few but matter most.
        bucket = host if kind == "telemetry" else f"{host}/{kind}"
        if not self._admit(bucket, now):
            if len(self._buckets) >= MAX_HOSTS:
                return self._drop("too_many_hosts", host, f"over {MAX_HOSTS} host names seen")
            return self._drop("rate_limited", host, f"more {kind} than the host's rate")
        try:
            if kind == "telemetry":
                # The lighter view: every field of Telemetry, histograms with sum and count only
                # (nothing here reads buckets), so it is used as a Telemetry from here on.
                snapshot = cast(Telemetry, codec.decode(payload, TelemetryTotals))
                self._telemetry(host, snapshot, now)
            elif kind == "events":
                self._event(host, codec.decode(payload, Event))
            elif kind == "status":
                self._status(host, codec.decode(payload, Status), now)
            else:
                self._result(host, codec.decode(payload, CommandResult))
        except DecodeError as exc:
            self._drop(exc.reason, host, exc.detail)

    def _admit(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        config = self.fleet_config
        if bucket is None:
            if len(self._buckets) >= MAX_HOSTS:
                return False
            bucket = self._buckets[key] = TokenBucket(config.burst, now)
        bucket.tokens = min(config.burst,
                            bucket.tokens + (now - bucket.last) * config.max_messages_per_s)
        bucket.last = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _drop(self, reason: str, where: str, detail: str) -> None:
        self.stats.dropped[reason] += 1
        # One line per (reason, host or topic): a flood must not become a flood of log lines.
        if (reason, where) not in self._logged and len(self._logged) < 10_000:
            self._logged.add((reason, where))
            log.warning("message_dropped", reason=reason, source=where, detail=detail[:300])

    def _bad_ts(self, host: str, ts: float, wall: float) -> bool:
        if math.isfinite(ts) and abs(ts - wall) <= MAX_CLOCK_SKEW_S:
            return False
        self._drop("bad_timestamp", host, f"ts {ts!r} is more than {MAX_CLOCK_SKEW_S:.0f} s "
                   "from the controller's clock (seconds since the epoch expected)")
        return True

    def _telemetry(self, host: str, t: Telemetry, now: float) -> None:
        if t.host != host:
            return self._drop("host_mismatch", host, f"telemetry names host {t.host!r}")
        wall = self.wall()
        if self._bad_ts(host, t.ts, wall):
            return
        verdict, transition = self.fleet.apply_telemetry(t, now, wall)
        if verdict is Verdict.DUPLICATE:
            return self._drop("duplicate", host, f"seq {t.seq} of run {t.run_id} seen before")
        self.stats.messages["telemetry"] += 1
        age = wall - t.ts
        if self._freshest is None or age < self._freshest:
            self._freshest = age
        if transition is not None:
            self._host_transition(transition, t.ts)
        if verdict is Verdict.LATE:
            return  # it fills a gap in the count; the models have moved past it
        state = self.fleet.hosts[host]
        rule_state = self._rule_state.get(host)
        if rule_state is None:
            rule_state = self._rule_state[host] = HostRuleState()
        self.alerts.sync(host, "telemetry",
                         telemetry_conditions(state, t, rule_state, self.rules), t.ts)
        if self.analytics is not None:
            self.analytics.add(t, state.previous)

    def _event(self, host: str, event: Event) -> None:
        if event.host != host:
            return self._drop("host_mismatch", host, f"event names host {event.host!r}")
        if self._bad_ts(host, event.ts, self.wall()):
            return
        self.stats.messages["events"] += 1
        state = self.fleet.hosts.get(host)
        if state is not None:
            state.events.append(event)
        condition = event_condition(event, self.rules)
        if condition is not None:
            self.alerts.hold(condition, event.ts + self.rules.xid_hold_s, event.ts)
        self.on_event(host, event)

    def _result(self, host: str, result: CommandResult) -> None:
        if result.host != host:
            return self._drop("host_mismatch", host, f"result names host {result.host!r}")
        self.stats.messages["results"] += 1
        if result.status == "error":
            log.warning("command_result_error", host=host, command_id=result.command_id,
                        error=result.error)
        self.on_result(result)

    def _status(self, host: str, status: Status, now: float) -> None:
        if status.host != host:
            return self._drop("host_mismatch", host, f"status names host {status.host!r}")
        if self._bad_ts(host, status.ts, self.wall()):
            return
        self.stats.messages["status"] += 1
        transition = self.fleet.apply_status(status, now, self.wall())
        if transition is not None:
            self._host_transition(transition, status.ts)

    def _host_transition(self, t: Transition, ts: float) -> None:
        log.info("host_online" if t.online else "host_offline", host=t.host, reason=t.reason)
        condition = None if t.online else host_offline_condition(t.host, t.reason)
        self._lost.pop(t.host, None)
        if condition is not None and t.reason == "lost":
            self._lost[t.host] = (condition, self.monotonic() + LOST_CONFIRM_S, ts)
            return
        self.alerts.sync(t.host, "host", [condition] if condition else [], ts)

    def _confirm_lost(self, now: float) -> None:
        for host, (condition, due, ts) in list(self._lost.items()):
            if now >= due:
                del self._lost[host]
                self.alerts.sync(host, "host", [condition], ts)

    def sweep(self) -> None:
        """Staleness, held alerts that ran out, and the alert transitions since the last sweep
        written and sent: run a few times a second."""
        wall, now = self.wall(), self.monotonic()
        if self._freshest is not None:
            self.stats.lag_s, self._freshest = max(0.0, self._freshest), None
        connects = self.link_connects()
        if connects > max(self._connects_seen, 1):
            self._link_was_down = True  # it went down and came back since the last sweep
        self._connects_seen = max(self._connects_seen, connects)
        if not self.link_up():
            # Cut off from the broker, the controller hears nobody: that says nothing about
            # the hosts. Their silence counts again from the reconnect.
            self._link_was_down = True
        else:
            if self._link_was_down:
                self.fleet.heard_all(now)
                self._link_was_down = False
                self._lost = {host: (condition, now + LOST_AFTER_RECONNECT_S, ts)
                              for host, (condition, _, ts) in self._lost.items()}
            self._confirm_lost(now)
            # When ingest itself runs behind (a backlog after a restart, a burst), silence is
            # judged as of the data it has reached, or every host would flap offline and back.
            behind = min(self.stats.lag_s, MAX_LAG_ALLOWANCE_S)
            for transition in self.fleet.sweep(now - behind, wall):
                self._host_transition(transition, wall)
        self.alerts.expire(wall)
        self.alerts.commit()
        if wall - self._last_forget >= FORGET_CHECK_S:
            self._last_forget = wall
            self._forget(self.fleet.gone(wall, self.fleet_config.forget_after_s))

    def _forget(self, hosts: list[str]) -> None:
        for host in hosts:
            self._rule_state.pop(host, None)
            self._lost.pop(host, None)
            for key in [k for k in self._buckets if k == host or k.startswith(host + "/")]:
                del self._buckets[key]
            series = self.analytics.forget_host(host) if self.analytics is not None else 0
            log.info("host_forgotten", host=host, series=series)
