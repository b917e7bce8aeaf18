"""What the controller knows about each host: online or not, its last snapshot, its gaps.

A host is online from its retained ``online`` status or its first telemetry. It goes offline
three ways, and the reason is kept: ``shutdown`` (the agent said so on a clean stop), ``lost``
(the broker published its Last Will) and ``stale`` (nothing for ``stale_after_intervals`` of
its own intervals, which catches a hung agent whose connection is still up). Every method takes
the time from its caller, so the whole class runs in tests without a clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from llm_ops_helper.proto.messages import Event, ReplicaSample, Status, Telemetry
from llm_ops_helper.proto.sequence import SeqTracker, Verdict

OfflineReason = Literal["shutdown", "lost", "stale"]
# The shortest silence that makes a host stale, whatever interval it claims: the sweep runs
# four times a second, and an interval of 0 (or 0.05 s) must not flap a host every sweep.
MIN_STALE_S = 2.0
# Restart times kept per replica: more than any replica_restarts_max a rule would count.
RESTARTS_KEPT = 64


@dataclass(slots=True)
class ReplicaState:
    name: str
    runtime: str
    up: bool
    # Wall time of the last (re)start seen: first seen, came up, or its counters reset.
    started_at: float
    ever_up: bool = False
    # The last value of its restart counter (see _restart_counter).
    last_total: float | None = None
    # The last restart count its agent reported (supervised replicas only; 0 for the others).
    agent_restarts: int = 0
    restarts: deque[float] = field(default_factory=lambda: deque(maxlen=RESTARTS_KEPT))


@dataclass(slots=True)
class HostState:
    host: str
    online: bool = False
    offline_reason: OfflineReason | None = None
    # Wall time of the last change between online and offline.
    since: float = 0.0
    status: Status | None = None
    telemetry: Telemetry | None = None
    # The controller's wall time when ``telemetry`` arrived (its ``ts`` is the agent's clock).
    received_at: float = 0.0
    previous: Telemetry | None = None
    interval_s: float = 1.0
    last_seen: float = 0.0  # monotonic, for staleness
    messages: int = 0
    replicas: dict[str, ReplicaState] = field(default_factory=dict)
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=50))


@dataclass(frozen=True, slots=True)
class Transition:
    """A host going online or offline; ``reason`` says why it went offline."""

    host: str
    online: bool
    reason: OfflineReason | None = None


@dataclass
class Fleet:
    stale_after_intervals: float = 3.0
    hosts: dict[str, HostState] = field(default_factory=dict)
    seq: SeqTracker = field(default_factory=SeqTracker)

    def _host(self, host: str) -> HostState:
        state = self.hosts.get(host)
        if state is None:
            state = self.hosts[host] = HostState(host)
        return state

    def _set_online(self, state: HostState, wall: float) -> Transition | None:
        if state.online:
            return None
        state.online, state.offline_reason, state.since = True, None, wall
        return Transition(state.host, True)

    def _set_offline(self, state: HostState, reason: OfflineReason,
                     wall: float) -> Transition | None:
        if not state.online and state.offline_reason is not None:
            if reason != "stale":  # a Will or a clean stop after staleness says more
                state.offline_reason = reason
            return None
        state.online, state.offline_reason, state.since = False, reason, wall
        return Transition(state.host, False, reason)

    def apply_status(self, status: Status, now: float, wall: float) -> Transition | None:
        state = self._host(status.host)
        state.status = status
        if status.interval_s:
            state.interval_s = status.interval_s
        if status.state == "online":
            state.last_seen = now
            return self._set_online(state, wall)
        reason: OfflineReason = "shutdown" if status.reason == "shutdown" else "lost"
        return self._set_offline(state, reason, wall)

    def apply_telemetry(self, telemetry: Telemetry, now: float,
                        wall: float) -> tuple[Verdict, Transition | None]:
        """Record a snapshot. A duplicate changes nothing; a late one only fills its gap."""
        verdict = self.seq.observe(telemetry.host, telemetry.run_id, telemetry.seq)
        if verdict is Verdict.DUPLICATE:
            return verdict, None
        state = self._host(telemetry.host)
        state.messages += 1
        state.last_seen = now
        if verdict is Verdict.LATE:
            return verdict, None
        state.previous, state.telemetry = state.telemetry, telemetry
        state.received_at = wall
        state.interval_s = telemetry.interval_s or state.interval_s
        self._track_replicas(state, telemetry.replicas, telemetry.ts)
        return verdict, self._set_online(state, wall)

    def _track_replicas(self, state: HostState, replicas: list[ReplicaSample],
                        wall: float) -> None:
        known = state.replicas
        for sample in replicas:
            replica = known.get(sample.name)
            total = _restart_counter(sample)
            if replica is None:
                known[sample.name] = ReplicaState(sample.name, sample.runtime, sample.up,
                                                  started_at=wall, ever_up=sample.up,
                                                  last_total=total,
                                                  agent_restarts=sample.restarts)
                continue
            came_back = sample.up and not replica.up and replica.ever_up
            # Counters going backwards while it answered: the server restarted in between.
            reset = sample.up and total is not None and replica.last_total is not None \
                and total < replica.last_total
            # The agent's own count catches restarts between two snapshots that left it up
            # with counters not yet back where they were (or that no scrape ever saw). It is
            # read while up only: the agent counts a restart as it schedules it, and the
            # snapshot that sees it up again is the one that counts it.
            restarted = 0
            if sample.up:
                restarted = max(sample.restarts - replica.agent_restarts, int(came_back or reset))
                replica.agent_restarts = sample.restarts  # (lower after an agent lost state)
            if restarted > 0:
                replica.started_at = wall
                replica.restarts.extend([wall] * min(restarted, RESTARTS_KEPT))
            replica.up = sample.up
            replica.ever_up = replica.ever_up or sample.up
            if total is not None:
                replica.last_total = total
        if len(known) != len(replicas):
            for name in known.keys() - {r.name for r in replicas}:
                del known[name]

    def sweep(self, now: float, wall: float) -> list[Transition]:
        """Hosts that turned stale since the last sweep."""
        out = []
        for state in self.hosts.values():
            window = max(self.stale_after_intervals * state.interval_s, MIN_STALE_S)
            silent = now - state.last_seen > window
            if state.online and silent and (t := self._set_offline(state, "stale", wall)):
                out.append(t)
        return out

    def gone(self, wall: float, after_s: float) -> list[str]:
        """Forget hosts offline for longer than ``after_s``; their names."""
        names = [s.host for s in self.hosts.values()
                 if not s.online and s.offline_reason is not None and wall - s.since > after_s]
        for name in names:
            del self.hosts[name]
            self.seq.forget(name)
        return names

    def heard_all(self, now: float) -> None:
        """Count every host as heard from now (the controller's own link was down)."""
        for state in self.hosts.values():
            state.last_seen = max(state.last_seen, now)

    def counts(self) -> dict[str, int]:
        online = sum(1 for s in self.hosts.values() if s.online)
        return {"online": online, "offline": len(self.hosts) - online}


# Counters every runtime mapping has; a server that restarted starts them again from zero.
_RESTART_COUNTERS = ("requests_finished_total", "prompt_tokens_total", "generation_tokens_total")


def _restart_counter(sample: ReplicaSample) -> float | None:
    """The first restart counter the replica reports (None: it reports none)."""
    metrics = sample.metrics
    for name in _RESTART_COUNTERS:
        value = metrics.get(name)
        if value is not None:
            return value
    return None
