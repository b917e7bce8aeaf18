"""What agents say about the replicas: telemetry snapshots and ``replica_state`` events.

An event is news at once; a snapshot comes every interval and says what every replica of the
host is doing. For each replica the newer of the two counts (both carry the agent's own clock).
A host whose latest report is newer than the last command sent for a replica, and does not
mention it, does not run it.
"""

from __future__ import annotations

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
    ts: float


class Observer:
    def __init__(self, fleet: Fleet, started_at: float) -> None:
        self.fleet = fleet
        # Hosts not heard of since the controller started count as offline from then.
        self.started_at = started_at
        self._events: dict[str, tuple[str, Observed]] = {}  # replica -> (host, observed)
        # Host -> (the snapshot indexed, its replicas by name): indexed once per snapshot.
        self._samples: dict[str, tuple[object, dict[str, ReplicaSample]]] = {}

    def on_event(self, host: str, event: Event) -> bool:
        """Remember a replica_state event; whether it was one."""
        state = event.data.get("state")
        if event.kind != "replica_state" or event.replica is None or state not in REPLICA_STATES:
            return False
        data = event.data
        reason, url, restarts = data.get("reason"), data.get("url"), data.get("restarts")
        self._events[event.replica] = (host, Observed(
            str(state), None if reason is None else str(reason),
            None if url is None else str(url),
            restarts if isinstance(restarts, int) else 0, event.ts))
        return True

    def forget(self, replica: str) -> None:
        self._events.pop(replica, None)

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
            seen = Observed(None, None, None, 0, telemetry.ts) if s is None else Observed(
                s.state, s.reason or s.error, s.url, s.restarts, telemetry.ts)
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

    def view(self, r: ReplicaRecord, deadline: float) -> ReplicaView:
        host = self.fleet.hosts.get(r.host)
        online = host is not None and host.online
        since = None if online else max(host.since if host else 0.0, self.started_at)
        seen = self.observe(r)
        return ReplicaView(
            name=r.name, revision=r.revision, host=r.host, created_at=r.created_at,
            phase=r.phase, sent_at=r.sent_at, state=seen.state if seen else None,
            reason=seen.reason if seen else None,
            reported_after_send=seen is not None and seen.ts > r.sent_at,
            host_online=online, offline_since=since, failed=r.failed,
            ever_ready=r.ready_at is not None, deadline=deadline,
            drain_timeout_s=r.spec.drain_timeout_s)
