"""What agents say about the replicas: telemetry snapshots and ``replica_state`` events.

An event is news at once; a snapshot comes every interval and says what every replica of the
host is doing. For each replica the newer of the two counts (both carry the agent's own clock,
so they compare). Whether a report came after a command is judged by the controller's own
clock, when the report arrived: agents' clocks may be off by minutes. A host whose latest
report arrived after the last command sent for a replica, and does not mention it, does not
run it. A replica whose host has said nothing since the controller started is unknown, not
"not ready": the planner takes no decision about it until its host reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llm_ops_helper.controller.deployments.rollout import ReplicaView, Totals
from llm_ops_helper.controller.deployments.store import ReplicaRecord
from llm_ops_helper.controller.fleet import Fleet
from llm_ops_helper.proto.messages import REPLICA_STATES, Event, ReplicaSample


@dataclass(frozen=True, slots=True)
class Observed:
    state: str | None  # None: the host's report does not mention it
    reason: str | None
    url: str | None
    restarts: int
    ts: float  # the agent's clock
    received: float  # the controller's clock, when the report arrived


class Observer:
    def __init__(self, fleet: Fleet, started_at: float,
                 link_since: Callable[[], float | None] | None = None) -> None:
        self.fleet = fleet
        # Hosts not heard of since the controller started count as offline from then.
        self.started_at = started_at
        # When the broker link last connected (None: down now). A host's absence counts only
        # while the controller could have heard it: from the later of the two.
        self.link_since: Callable[[], float | None] = link_since or (lambda: started_at)
        self._events: dict[str, tuple[str, Observed]] = {}  # replica -> (host, observed)
        # Host -> (the snapshot indexed, its replicas by name): indexed once per snapshot.
        self._samples: dict[str, tuple[object, dict[str, ReplicaSample]]] = {}

    def on_event(self, host: str, event: Event, received: float) -> bool:
        """Remember a replica_state event that is news; whether it was (a QoS 1 redelivery,
        or one older than the event already kept, is not)."""
        state = event.data.get("state")
        if event.kind != "replica_state" or event.replica is None or state not in REPLICA_STATES:
            return False
        kept = self._events.get(event.replica)
        if kept is not None and kept[0] == host and kept[1].ts >= event.ts:
            return False
        data = event.data
        reason, url, restarts = data.get("reason"), data.get("url"), data.get("restarts")
        self._events[event.replica] = (host, Observed(
            str(state), None if reason is None else str(reason),
            None if url is None else str(url),
            restarts if isinstance(restarts, int) else 0, event.ts, received))
        return True

    def forget(self, replica: str) -> None:
        self._events.pop(replica, None)

    def prune(self) -> None:
        """Drop what is kept for hosts the fleet has forgotten."""
        for host in self._samples.keys() - self.fleet.hosts.keys():
            del self._samples[host]

    def online(self, host: str) -> bool:
        state = self.fleet.hosts.get(host)
        return state is not None and state.online

    def replicas_of(self, host: str) -> dict[str, ReplicaSample]:
        state = self.fleet.hosts.get(host)
        telemetry = state.telemetry if state is not None else None
        if telemetry is None:
            return {}
        cached = self._samples.get(host)
        if cached is None or cached[0] is not telemetry:
            cached = self._samples[host] = (telemetry, {s.name: s for s in telemetry.replicas})
        return cached[1]

    def observe(self, r: ReplicaRecord) -> Observed | None:
        """What the agent last said about a replica (None: nothing since the controller
        started)."""
        host = self.fleet.hosts.get(r.host)
        seen: Observed | None = None
        telemetry = host.telemetry if host is not None else None
        if telemetry is not None:
            s = self.replicas_of(r.host).get(r.name)
            received = host.received_at if host is not None else 0.0
            seen = Observed(None, None, None, 0, telemetry.ts, received) if s is None \
                else Observed(s.state, s.reason or s.error, s.url, s.restarts, telemetry.ts,
                              received)
        event = self._events.get(r.name)
        # On a tie the event wins: it is the transition itself.
        if event is not None and event[0] == r.host and (seen is None or event[1].ts >= seen.ts):
            seen = event[1]
        return seen

    def ready(self, r: ReplicaRecord) -> bool:
        seen = self.observe(r)
        return seen is not None and seen.state == "ready"

    def totals(self, r: ReplicaRecord) -> Totals:
        """Its request counters, for the canary comparison."""
        s = self.replicas_of(r.host).get(r.name)
        if s is None:
            return Totals()
        finished = s.metrics.get("requests_finished_total", 0.0)
        failed = s.metrics.get("requests_failed_total", 0.0)
        ttft = s.histograms.get("ttft_seconds")
        return Totals(finished + failed, failed, ttft.sum if ttft else 0.0,
                      ttft.count if ttft else 0.0)

    def offline_since(self, host: str) -> float | None:
        """Since when a host counts as away (None: online, or no verdict). No verdict while the
        broker link is down, nor while the controller has heard of no host at all since it
        started (a link that is up but carries nothing, an ACL gone wrong): hearing nobody
        says nothing of the hosts."""
        state = self.fleet.hosts.get(host)
        if state is not None and state.online:
            return None
        link = self.link_since()
        if link is None or not self.fleet.hosts:
            return None
        return max(state.since if state else 0.0, self.started_at, link)

    def view(self, r: ReplicaRecord, deadline: float) -> ReplicaView:
        host = self.fleet.hosts.get(r.host)
        online = host is not None and host.online
        seen = self.observe(r)
        observed = seen is not None and seen.received > self.started_at
        return ReplicaView(
            name=r.name, revision=r.revision, host=r.host, created_at=r.created_at,
            phase=r.phase, sent_at=r.sent_at, state=seen.state if seen else None,
            reason=seen.reason if seen else None, observed=observed,
            reported_after_send=observed and seen is not None and seen.received > r.sent_at,
            host_online=online, offline_since=self.offline_since(r.host), failed=r.failed,
            ever_ready=r.ready_at is not None, deadline=deadline,
            drain_timeout_s=r.spec.drain_timeout_s, winding_since=r.wound_down_at)
