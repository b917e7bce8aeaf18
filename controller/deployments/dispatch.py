"""The plan's decisions about replicas, carried out: records made and dropped, commands sent.

:class:`Dispatcher` places new replicas with the scheduler (a record each, then the deploy
command), winds replicas down (a drain or a stop), sends every record the command its phase
calls for, and stops what agents run for a deployment with no record here (orphans).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from collections.abc import Callable, Iterable

import msgspec
import structlog

from llm_ops_helper.controller.deployments.commands import CommandError, CommandSender
from llm_ops_helper.controller.deployments.failures import Failures
from llm_ops_helper.controller.deployments.ledger import Ledger
from llm_ops_helper.controller.deployments.models import gpu_need, replica_spec
from llm_ops_helper.controller.deployments.observe import Observer
from llm_ops_helper.controller.deployments.rollout import Plan, Timing
from llm_ops_helper.controller.deployments.scheduler import (
    PlacementRequest,
    Reservation,
    host_view,
    place,
)
from llm_ops_helper.controller.deployments.store import Deployment, ReplicaRecord
from llm_ops_helper.controller.fleet import Fleet
from llm_ops_helper.proto.messages import Alert, CommandKind, StopReplica

_FIGURES = re.compile(r"\d+(?:\.\d+)?")
# New replicas placed per deployment per pass: a large scale-up goes in steps, and a pass
# (which runs on the event loop) stays short. The next pass follows at once.
MAX_PLACEMENTS_PER_PASS = 50
log = structlog.get_logger("llmops.controller.deployments")


class Dispatcher:
    def __init__(self, ledger: Ledger, observer: Observer, fleet: Fleet,
                 sender: CommandSender, failures: Failures, timing: Timing,
                 firing: Callable[[], Iterable[Alert]], artifact_url: Callable[[str, str], str],
                 suffix: Callable[[], str], again: Callable[[str], None]) -> None:
        self.ledger = ledger
        self.observer = observer
        self.fleet = fleet
        self.sender = sender
        self.failures = failures
        self.timing = timing
        self.firing = firing
        self.artifact_url = artifact_url
        self.suffix = suffix
        # Asks for another pass over a deployment at once (what one pass left to place).
        self.again = again
        # (host, replica) -> when an orphan was last told to stop.
        self._orphans: dict[tuple[str, str], float] = {}

    def _artifact_url(self, sha256: str, host: str) -> str:
        """The URL that host downloads an artifact from (signed for that host)."""
        return self.artifact_url(sha256, host)

    def carry_out(self, d: Deployment, p: Plan, now: float) -> None:
        """The plan's steps for the replicas a deployment has: records forgotten, failures
        told, replicas stopped or drained, commands sent again."""
        for f in p.forget:
            record = self.ledger.drop(f.name)
            self.observer.forget(f.name)
            self.ledger.store.delete_replica(f.name)
            if f.kind == "lost":
                self.ledger.event(d.name, "replica_lost", f"{f.name}: {f.why}; replacing it",
                                  now, replica=f.name, level="warning")
            elif record is not None:
                self.ledger.event(d.name, "replica_removed",
                                  f"{f.name} on {record.host}: {f.why}", now, replica=f.name)
        for name, why in p.failed:
            self.ledger.event(d.name, "replica_failed", why, now, replica=name,
                              level="warning")
        for name, why in p.stop:
            self.wind_down(self.ledger.records[name], "stopping", why, now)
        for name, why in p.drain:
            self.wind_down(self.ledger.records[name], "draining", why, now)
        for name in p.resend:
            self.send(self.ledger.records[name], now, resend=True)

    def place(self, d: Deployment, count: int, now: float) -> None:
        rev = self.ledger.revision(d)
        alerts = list(self.firing())
        hosts = [host_view(s, alerts) for s in self.fleet.hosts.values()]
        need = gpu_need(rev.spec, rev.runtime, rev.model, hosts)
        now_count = min(count, MAX_PLACEMENTS_PER_PASS)
        request = PlacementRequest(d.name, rev.runtime, rev.spec.gpus_per_replica, need,
                                   now_count)
        reservations = [Reservation(r.host, tuple(r.gpus), r.spec.gpu_memory_bytes or 0)
                        for r in self.ledger.records.values()
                        if r.phase == "active" and r.gpus and not self.observer.ready(r)]
        # Spread against the replicas that stay: in a rollout the old revision's are all on
        # their way out, and counting them drew every new replica onto one host.
        existing = Counter(r.host for r in self.ledger.records_of(d.name)
                           if r.phase == "active" and r.version == rev.version)
        avoided = self.failures.avoided(d.name, now)
        placement = place(request, [
            dataclasses.replace(h, unhealthy=f"a replica of {d.name} failed there lately")
            if h.host in avoided else h for h in hosts], reservations, existing)
        if avoided and not placement.placed:  # nowhere else: the host it failed on it is
            placement = place(request, hosts, reservations, existing)
        if count > now_count:  # the rest next pass, at once
            self.again(d.name)
        for placed in placement.placed:
            name = self.ledger.new_name(d, self.suffix)
            spec = replica_spec(rev, name, list(placed.gpus), need,
                                functools.partial(self._artifact_url, host=placed.host))
            record = ReplicaRecord(name=name, deployment=d.name, revision=d.revision,
                                   version=rev.version, host=placed.host,
                                   gpus=list(placed.gpus), spec=spec, created_at=now,
                                   why=placed.why)
            self.ledger.store.save_replica(record)
            self.ledger.keep(record)
            self.ledger.event(d.name, "replica_placed", f"{name} -> {placed.why}", now,
                              replica=name, host=placed.host, gpus=list(placed.gpus))
            self.send(record, now)
        if placement.refused != d.refused:
            # Free memory moves every second on a busy GPU: a refusal is news (an event, a
            # log line) when its reasons change, not its figures.
            news = placement.refused is not None and (
                d.refused is None or _shape(placement.refused) != _shape(d.refused))
            d.refused = placement.refused
            self.ledger.touch(d, now)
            if news and placement.refused is not None:
                self.ledger.event(d.name, "placement_refused", placement.refused, now,
                                  level="warning")

    def wind_down(self, record: ReplicaRecord, phase: str, why: str, now: float) -> None:
        record.phase = "draining" if phase == "draining" else "stopping"
        record.command_error = None
        if record.wound_down_at is None:
            record.wound_down_at = now
        self.ledger.event(record.deployment, "replica_draining" if phase == "draining"
                          else "replica_stopping", f"{record.name} on {record.host}: {why}",
                          now, replica=record.name)
        self.send(record, now)

    def send(self, record: ReplicaRecord, now: float, resend: bool = False) -> None:
        """The command a record's phase calls for, to an online host; remembered as sent either
        way, so a host offline now gets it ``command_retry_s`` after it is back."""
        if record.phase != "active" and record.wound_down_at is None:  # a record from before
            record.wound_down_at = record.sent_at or now                # the field existed
        record.sent_at, record.sends = now, record.sends + 1
        self.ledger.store.save_replica(record)
        if not self.observer.online(record.host):
            return
        body: msgspec.Struct
        if record.phase == "active":
            kind, body = CommandKind.DEPLOY_REPLICA, record.spec
        elif record.phase == "draining":
            kind = CommandKind.DRAIN_REPLICA
            body = StopReplica(name=record.name, drain=True,
                               timeout_s=record.spec.drain_timeout_s)
        else:
            kind, body = CommandKind.STOP_REPLICA, StopReplica(name=record.name, drain=False,
                                                               timeout_s=0.0)
        try:
            self.sender.send(record.host, kind, body, replica=record.name)
        except CommandError as exc:
            log.error("command_not_sent", host=record.host, replica=record.name,
                      kind=kind.value, error=str(exc))
            return
        if resend:
            log.info("command_resent", host=record.host, replica=record.name, kind=kind.value,
                     sends=record.sends)

    def stop_orphans(self, now: float) -> None:
        """Replicas agents run for a deployment with no record here (a record given up while
        its host was away, a duplicate): stopped, a ready one drained first."""
        for host, state in self.fleet.hosts.items():
            if not state.online or state.telemetry is None:
                continue
            for s in state.telemetry.replicas:
                record = self.ledger.records.get(s.name)
                if s.deployment is None or s.state in (None, "stopped") or \
                        (record is not None and record.host == host):
                    continue
                last = self._orphans.get((host, s.name))
                if last is not None and now - last < self.timing.retry_s:
                    continue
                self._orphans[(host, s.name)] = now
                drain = s.state == "ready"
                kind = CommandKind.DRAIN_REPLICA if drain else CommandKind.STOP_REPLICA
                try:
                    self.sender.send(host, kind, StopReplica(name=s.name, drain=drain,
                                                             timeout_s=30.0 if drain else 0.0),
                                     replica=s.name)
                except CommandError as exc:
                    log.error("command_not_sent", host=host, replica=s.name, error=str(exc))
                    continue
                self.ledger.event(s.deployment, "orphan_stopped", f"{s.name} on {host} "
                                  f"({s.state}) has no record here: {kind.value}", now,
                                  replica=s.name, host=host, level="warning")
        if len(self._orphans) > 10_000:
            horizon = now - 10 * self.timing.retry_s
            self._orphans = {k: t for k, t in self._orphans.items() if t >= horizon}


def _shape(message: str) -> str:
    """A message with its figures blanked out."""
    return _FIGURES.sub("#", message)
