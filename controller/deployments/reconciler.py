"""The deployment engine: desired state in, signed commands out, until the fleet matches.

:class:`Deployments` holds every deployment, its revisions and its replica records (the only
record of where replicas should run: the reconciler is their only writer), persisted in
SQLite. Each pass (:meth:`Deployments.tick`) joins the records with what the agents report
(telemetry, and ``replica_state`` events, the newer of the two), asks the pure planner what to
do, places new replicas with the scheduler, sends the commands and records every decision as
an event. :meth:`Deployments.run` makes a pass every ``reconcile_interval_s`` and whenever
something changed (an apply, an event, a command result): news reconciles only the
deployments it concerns, and every deployment is looked at each interval.

What the controller does not know it leaves alone: after a restart, a replica whose host has
not reported since gets no stop, drain or resend; while the broker link is down (or nothing at
all has been heard since start-up) no host counts as lost. A replica that fails outside a
rollout is replaced after a backoff per deployment (10 s doubling to 5 min, reset once the
deployment is available), away from the host it failed on while another host fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

import llm_ops_helper.controller.deployments.views as views
from llm_ops_helper.controller.deployments.commands import CommandError, CommandSender
from llm_ops_helper.controller.deployments.errors import (
    Conflict,
    DeploymentError,
    Invalid,
    NotFound,
)
from llm_ops_helper.controller.deployments.models import (
    ModelResolver,
    gpu_need,
    replica_spec,
    resolve,
    runtime_for,
)
from llm_ops_helper.controller.deployments.observe import Observer
from llm_ops_helper.controller.deployments.rollout import (
    Plan,
    ReplicaView,
    Timing,
    Totals,
    judge,
    plan,
)
from llm_ops_helper.controller.deployments.scheduler import (
    PlacementRequest,
    Reservation,
    feasible,
    host_view,
    place,
)
from llm_ops_helper.controller.deployments.spec import (
    REVISION_FIELDS,
    DeploymentSpec,
    check_name,
    check_replicas,
    check_spec,
    revision_key,
)
from llm_ops_helper.controller.deployments.store import (
    Deployment,
    DeploymentStore,
    EventRow,
    ModelInfo,
    ReplicaRecord,
    Revision,
)
from llm_ops_helper.controller.fleet import Fleet
from llm_ops_helper.proto.messages import (
    Alert,
    CommandKind,
    CommandResult,
    Event,
    StopReplica,
)

_FIGURES = re.compile(r"\d+(?:\.\d+)?")
# A deployment whose replicas keep failing places no new one for 10 s after the first failure,
# doubling up to 5 minutes; the host that failed one is avoided (while another fits) this long.
BACKOFF_FIRST_S = 10.0
BACKOFF_MAX_S = 300.0
AVOID_HOST_S = 300.0
# New replicas placed per deployment per pass: a large scale-up goes in steps, and a pass
# (which runs on the event loop) stays short. The next pass follows at once.
MAX_PLACEMENTS_PER_PASS = 50
log = structlog.get_logger("llmops.controller.deployments")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    reconcile_interval_s: float = 2.0
    command_retry_s: float = 10.0
    host_lost_grace_s: float = 60.0
    # The controller's backstop behind the agent's ready timeout: placed + ready_timeout_s +
    # this + artifact size / fetch_bytes_per_s.
    fetch_allowance_s: float = 120.0
    fetch_bytes_per_s: float = 50e6


class Deployments:
    def __init__(self, store: DeploymentStore, fleet: Fleet,
                 firing: Callable[[], Iterable[Alert]], registry: ModelResolver,
                 sender: CommandSender, artifact_url: Callable[[str], str],
                 config: EngineConfig = EngineConfig(),
                 clock: Callable[[], float] = time.time,
                 suffix: Callable[[], str] = lambda: secrets.token_hex(3)) -> None:
        self.store = store
        self.fleet = fleet
        self.firing = firing
        self.registry = registry
        self.sender = sender
        self.artifact_url = artifact_url
        self.config = config
        self.clock = clock
        self.suffix = suffix
        self.timing = Timing(config.command_retry_s, config.host_lost_grace_s)
        self.started_at = clock()
        self.deployments = {d.name: d for d in store.deployments()}
        self.revisions: dict[str, list[Revision]] = {}
        for r in store.revisions():
            self.revisions.setdefault(r.deployment, []).append(r)
        self.records: dict[str, ReplicaRecord] = {}
        # Deployment -> its records by name: one deployment's pass reads only its own.
        self._by_deployment: dict[str, dict[str, ReplicaRecord]] = {}
        for record in store.replicas():
            self._keep(record)
        # The broker link's state (the daemon's); when it last came up, None while down.
        self.link_up: Callable[[], bool] = lambda: True
        self._link_since: float | None = self.started_at
        self.observer = Observer(fleet, self.started_at, lambda: self._link_since)
        self._orphans: dict[tuple[str, str], float] = {}
        self._baselines: dict[str, dict[str, Totals]] = {}
        # (deployment, host) -> until when new replicas of it avoid that host.
        self._avoid: dict[tuple[str, str], float] = {}
        # Deployments that news (an event, a command result) concerns: the next pass
        # reconciles only these, unless a full pass is due.
        self._dirty: set[str] = set()
        self._last_full = float("-inf")
        self.wake = asyncio.Event()
        self.ticks = 0
        self.tick_errors = 0
        for d in self.deployments.values():
            if d.canary_started_at is not None and not d.canary_done:
                # Its baseline counters were in memory: the comparison window starts again
                # once the first new replica is seen ready.
                d.canary_started_at = None
                self._touch(d, self.started_at)
                self._event(d.name, "canary_restarted", "the controller restarted during the "
                            "canary comparison; its window starts again", self.started_at)

    # -- the API's verbs ---------------------------------------------------------------------

    def apply(self, name: str, spec: DeploymentSpec,
              by: str = "anonymous") -> tuple[dict[str, Any], bool]:
        """Create or change a deployment; (its view, whether it was created)."""
        check_name(name)
        check_spec(spec)
        d = self.deployments.get(name)
        if d is not None and d.deleting:
            raise Conflict(f"deployment {name} is being deleted; apply again once it is gone")
        model = resolve(self.registry, spec.model)
        runtime = runtime_for(spec, model)
        self._check_feasible(name, spec, model, runtime)
        now = self.clock()
        if d is None:
            d = Deployment(name=name, spec=spec, revision=0, created_at=now, updated_at=now,
                           created_by=by)
            # Written first: a failed write leaves nothing half-made in memory.
            self._add_revision(d, model, runtime, spec, by, f"created by {by}", now)
            self.deployments[name] = d
            self._event(name, "deployment_applied", f"created by {by}: {model.ref} x "
                        f"{spec.replicas} on {runtime}", now, version=model.ref, by=by)
            return self._settled(name), True
        current = self._revision(d)
        before = msgspec.structs.replace(current.spec, runtime=current.runtime)
        after = msgspec.structs.replace(spec, runtime=runtime)
        if revision_key(before, current.version) != revision_key(after, model.ref) \
                or d.failed is not None:
            reason = f"{by} changed {_changes(current, after, model.ref) or 'nothing (retry)'}"
            self._add_revision(d, model, runtime, spec, by, reason, now)
            self._event(name, "rollout_started", f"revision {d.revision}: {reason}", now,
                        version=model.ref, by=by)
        else:
            old_replicas = d.spec.replicas
            self._save(d, now, spec=spec)
            self._event(name, "deployment_applied", f"{by} applied without a new revision "
                        f"(replicas {old_replicas} -> {spec.replicas})", now, by=by)
        return self._settled(name), False

    def scale(self, name: str, replicas: int, by: str = "anonymous") -> dict[str, Any]:
        d = self._get(name, writable=True)
        check_replicas(d.spec, replicas)
        before, now = d.spec.replicas, self.clock()
        self._save(d, now, spec=msgspec.structs.replace(d.spec, replicas=replicas))
        self._event(name, "deployment_scaled", f"{by} scaled from {before} to {replicas}", now,
                    replicas=replicas, by=by)
        return self._settled(name)

    def rollback(self, name: str, version: str | None = None,
                 by: str = "anonymous") -> dict[str, Any]:
        d = self._get(name, writable=True)
        current = self._revision(d)
        if version is None:
            source = self._previous(d)
            if source is None:
                raise Conflict(f"deployment {name} has no version before {current.version} "
                               "to roll back to")
        else:
            model = resolve(self.registry, version)
            if model.ref == current.version and d.failed is None:
                raise Conflict(f"deployment {name} already runs {model.ref}")
            source = next((r for r in reversed(self.revisions[name])
                           if r.version == model.ref), None)
            if source is None:  # never deployed here: the current spec on that version
                spec = msgspec.structs.replace(current.spec, model=version)
                runtime = runtime_for(spec, model)
                self._check_feasible(name, spec, model, runtime)
                source = msgspec.structs.replace(current, version=model.ref,
                                                 requested=version, model=model,
                                                 runtime=runtime, spec=spec)
        blocked = self._unavailable(source)
        if blocked is not None:
            raise Conflict(f"deployment {name} cannot roll back to {source.version}: {blocked}")
        self._roll_back(d, source, f"rollback to {source.version} by {by}", by, self.clock())
        return self._settled(name)

    def delete(self, name: str, by: str = "anonymous") -> dict[str, Any]:
        d = self._get(name)
        if not d.deleting:
            now = self.clock()
            self._save(d, now, deleting=True, phase="deleting", message=f"deleted by {by}")
            self._event(name, "deployment_deleting", f"{by} deleted it; draining its replicas",
                        now, by=by)
        self.wake.set()
        return self.view(name)

    def _settled(self, name: str) -> dict[str, Any]:
        """The view after one reconcile pass of this deployment: what a change answers, so
        that it already says "progressing" (a client waiting for "available" must not see the
        phase from before the change)."""
        try:
            self._reconcile(self.deployments[name], self.clock())
        except Exception:
            self.tick_errors += 1
            log.exception("reconcile_failed", deployment=name)
        self.wake.set()
        return self.view(name)

    def get(self, name: str) -> dict[str, Any]:
        self._get(name)
        return self.view(name)

    def list_views(self) -> list[dict[str, Any]]:
        return [self.view(name) for name in sorted(self.deployments)]

    def endpoints(self, name: str) -> list[dict[str, Any]]:
        self._get(name)
        out = []
        for r in self._records_of(name):
            seen = self.observer.observe(r)
            if r.phase == "active" and seen is not None and seen.state == "ready" and seen.url \
                    and self.observer.online(r.host):
                out.append({"replica": r.name, "host": r.host, "url": seen.url,
                            "version": r.version})
        return out

    def history(self, name: str, limit: int = 200) -> dict[str, Any]:
        if name not in self.deployments and not self.store.events(name, 1):
            raise NotFound(f"no deployment named {name!r} (GET /api/v1/deployments lists them)")
        return {"revisions": [views.revision(r) for r in self.revisions.get(name, [])],
                "events": [views.event(e) for e in self.store.events(name, limit)]}

    def refs_in_use(self) -> set[str]:
        """The registry's ``in_use``: version refs a deployment runs or rolls to."""
        return set(self.versions_in_use())

    def versions_in_use(self) -> dict[str, list[str]]:
        """Model version ref -> the deployments running or rolling to it (for the registry's
        refusal to retire a version in use)."""
        used: dict[str, set[str]] = {}
        for d in self.deployments.values():
            # What it runs, the last version that completed, and where a plain rollback goes:
            # their artifacts must stay.
            for rev in (self._find(d, d.revision), self._find(d, d.stable),
                        self._previous(d)):
                if rev is not None:
                    used.setdefault(rev.version, set()).add(d.name)
        for r in self.records.values():
            used.setdefault(r.version, set()).add(r.deployment)
        return {ref: sorted(names) for ref, names in used.items()}

    # -- what agents say ---------------------------------------------------------------------

    def on_event(self, host: str, event: Event) -> None:
        """An event from an agent (ingest passes every one): replica_state news counts at
        once and wakes the loop."""
        record = self.records.get(event.replica or "")
        if record is not None and self.observer.on_event(host, event, self.clock()):
            self._dirty.add(record.deployment)
            self.wake.set()

    def on_result(self, result: CommandResult) -> None:
        sent = self.sender.on_result(result)
        if sent is None or result.status == "ok":
            return
        record = self.records.get(sent.replica or "")
        log.warning("command_failed", host=result.host, kind=sent.kind, replica=sent.replica,
                    command_id=result.command_id, error=result.error)
        if record is None:
            return
        error = result.error or "no reason given"
        if sent.kind == CommandKind.DEPLOY_REPLICA.value and record.phase == "active" \
                and record.failed is None:
            record.failed = f"agent on {result.host} refused replica {record.name}: {error}"
        elif sent.kind != CommandKind.DEPLOY_REPLICA.value and record.phase != "active":
            record.command_error = (f"agent on {result.host} refused {sent.kind} of "
                                    f"{record.name}: {error}")
        else:
            return
        self.store.save_replica(record)
        self._dirty.add(record.deployment)
        self.wake.set()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        async def relay() -> None:
            await stop.wait()
            self.wake.set()

        relay_task = asyncio.create_task(relay())
        try:
            while not stop.is_set():
                self.wake.clear()
                now = self.clock()
                # News wakes a pass over the deployments it concerns; every deployment is
                # looked at every reconcile_interval_s.
                full = now - self._last_full >= self.config.reconcile_interval_s
                try:
                    self.tick(now, full=full)
                except Exception:
                    # A locked database or a bug: this pass is lost, logged and counted; the
                    # next one starts from the persisted state again.
                    self.tick_errors += 1
                    log.exception("reconcile_failed")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.reconcile_interval_s):
                        await self.wake.wait()
                await asyncio.sleep(0.05)  # let a burst of events arrive: one pass for all
        finally:
            relay_task.cancel()

    def tick(self, now: float | None = None, full: bool = True) -> None:
        """One pass: every deployment (``full``), else those that news concerned."""
        now = self.clock() if now is None else now
        self.ticks += 1
        self._track_link(now)
        self.sender.expire(now)
        names = sorted(self.deployments) if full else sorted(self._dirty)
        self._dirty.clear()
        for name in names:
            d = self.deployments.get(name)
            if d is None:
                continue
            try:
                self._reconcile(d, now)
            except Exception:
                # One deployment's trouble (a missing revision, a locked database, a bug)
                # does not hold the others back; it is tried again next pass.
                self.tick_errors += 1
                log.exception("reconcile_failed", deployment=name)
        if full:
            self._last_full = now
            self._stop_orphans(now)
            self.observer.prune()
            self._avoid = {k: until for k, until in self._avoid.items() if until > now}

    def _track_link(self, now: float) -> None:
        if not self.link_up():
            self._link_since = None
        elif self._link_since is None:
            self._link_since = now

    def _reconcile(self, d: Deployment, now: float) -> None:
        records = self._records_of(d.name)
        replica_views = [self._view_of(r) for r in records]
        for r, v in zip(records, replica_views, strict=True):
            if v.state == "ready" and r.ready_at is None:
                r.ready_at = now
                self.store.save_replica(r)
                self._event(d.name, "replica_ready", f"{r.name} on {r.host} is ready", now,
                            replica=r.name, host=r.host)
        if self._judge_canary(d, replica_views, now):  # rolled back: records relabelled
            replica_views = [self._view_of(r) for r in records]
        versions = {r.revision: r.version for r in self.revisions.get(d.name, [])}
        p = plan(d, replica_views, versions, now, self.timing)
        self._carry_out(d, p, now)

    def _carry_out(self, d: Deployment, p: Plan, now: float) -> None:
        for f in p.forget:
            record = self._drop(f.name)
            self.observer.forget(f.name)
            self.store.delete_replica(f.name)
            if f.kind == "lost":
                self._event(d.name, "replica_lost", f"{f.name}: {f.why}; replacing it", now,
                            replica=f.name, level="warning")
            elif record is not None:
                self._event(d.name, "replica_removed", f"{f.name} on {record.host}: {f.why}",
                            now, replica=f.name)
        for name, why in p.failed:
            self._event(d.name, "replica_failed", why, now, replica=name, level="warning")
        for name, why in p.stop:
            self._wind_down(self.records[name], "stopping", why, now)
        for name, why in p.drain:
            self._wind_down(self.records[name], "draining", why, now)
        for name in p.resend:
            self._send(self.records[name], now, resend=True)
        if p.rollback is not None:
            stable = self._revision(d, d.stable)
            blocked = self._unavailable(stable)
            if blocked is None:
                self._mark_failed(d, p.rollback)
                self._roll_back(d, stable, p.rollback, "controller", now)
                return
            # Nothing safe to go back to: the rollout fails where it stands.
            version = self._revision(d).version
            why = p.rollback.removeprefix(f"automatic rollback from {version}: ")
            p.rollback, p.phase = None, "failed"
            p.fail_rollout = f"{why}; no rollback to {stable.version}: {blocked}"
            p.message = f"rollout of {version} failed: {p.fail_rollout}"
        if p.fail_rollout is not None:
            d.failed = p.fail_rollout
            self._mark_failed(d, p.fail_rollout)
            self._event(d.name, "rollout_failed", p.message, now, level="warning")
        if p.failed and p.fail_rollout is None:
            self._back_off(d, p.failed, now)
        if p.start_canary:
            d.canary_started_at = now
            self._baselines[d.name] = {
                r.name: self.observer.totals(r) for r in self._records_of(d.name)
                if r.name in self.observer.replicas_of(r.host)}
            self._event(d.name, "canary_started", f"holding the rollout "
                        f"{d.spec.rollback.observe_s:.0f} s to compare the first new replica "
                        "with the old ones", now)
        if p.completed:
            was_rollback = d.rolling_back
            d.stable, d.rolling_back = d.revision, False
            version = self._revision(d).version
            self._event(d.name, "rollback_completed" if was_rollback else "rollout_completed",
                        f"revision {d.revision} ({version}) complete: {p.message}", now,
                        version=version)
        waiting = bool(p.create) and d.backoff_until is not None and now < d.backoff_until
        if p.create and not waiting:
            self._place(d, p.create, now)
        if p.remove:
            self._remove(d, now)
            return
        message = p.message
        if d.refused is not None and p.create:
            message += f"; not placed: {d.refused}"
        if waiting:
            p.phase = "degraded"
            message += (f"; {_plural(d.failures, 'replica failure')} in a row, no new replica "
                        f"for {_backoff_s(d.failures):.0f} s; the last: {d.last_failure}")
        elif p.phase == "available" and d.failures:
            d.failures, d.last_failure, d.backoff_until = 0, None, None
            self._touch(d, now)
        refusals = [r.command_error for r in self._records_of(d.name)
                    if r.phase != "active" and r.command_error]
        if refusals:
            message += f"; {refusals[0]}"
        reason = self._revision(d).reason
        if reason.startswith("automatic rollback"):
            if p.phase == "available":
                message += f" (rolled back: {reason})"
            elif p.phase == "rolling_back" and not message.startswith(reason):
                message = f"{reason}; {message}"  # why first, then how far it got
        if (d.phase, d.message) != (p.phase, message):
            if d.phase != p.phase:
                log.info("deployment_phase", deployment=d.name, phase=p.phase,
                         previous=d.phase, message=message)
            d.phase, d.message = p.phase, message
            self._touch(d, now)
        elif p.completed or p.start_canary or p.fail_rollout:
            self._touch(d, now)

    # -- decisions carried out ---------------------------------------------------------------

    def _place(self, d: Deployment, count: int, now: float) -> None:
        rev = self._revision(d)
        alerts = self._firing()
        hosts = [host_view(s, alerts) for s in self.fleet.hosts.values()]
        need = gpu_need(rev.spec, rev.runtime, rev.model, hosts)
        now_count = min(count, MAX_PLACEMENTS_PER_PASS)
        request = PlacementRequest(d.name, rev.runtime, rev.spec.gpus_per_replica, need,
                                   now_count)
        reservations = [Reservation(r.host, tuple(r.gpus), r.spec.gpu_memory_bytes or 0)
                        for r in self.records.values()
                        if r.phase == "active" and r.gpus and not self.observer.ready(r)]
        existing = Counter(r.host for r in self._records_of(d.name) if r.phase == "active")
        avoided = {host for (name, host), until in self._avoid.items()
                   if name == d.name and until > now}
        placement = place(request, [
            dataclasses.replace(h, unhealthy=f"a replica of {d.name} failed there lately")
            if h.host in avoided else h for h in hosts], reservations, existing)
        if avoided and not placement.placed:  # nowhere else: the host it failed on it is
            placement = place(request, hosts, reservations, existing)
        if count > now_count:  # the rest next pass, at once
            self._dirty.add(d.name)
            self.wake.set()
        for placed in placement.placed:
            name = self._new_name(d)
            spec = replica_spec(rev, name, list(placed.gpus), need, self.artifact_url)
            record = ReplicaRecord(name=name, deployment=d.name, revision=d.revision,
                                   version=rev.version, host=placed.host,
                                   gpus=list(placed.gpus), spec=spec, created_at=now,
                                   why=placed.why)
            self.store.save_replica(record)
            self._keep(record)
            self._event(d.name, "replica_placed", f"{name} -> {placed.why}", now,
                        replica=name, host=placed.host, gpus=list(placed.gpus))
            self._send(record, now)
        if placement.refused != d.refused:
            # Free memory moves every second on a busy GPU: a refusal is news (an event, a
            # log line) when its reasons change, not its figures.
            news = placement.refused is not None and (
                d.refused is None or _shape(placement.refused) != _shape(d.refused))
            d.refused = placement.refused
            self._touch(d, now)
            if news and placement.refused is not None:
                self._event(d.name, "placement_refused", placement.refused, now,
                            level="warning")

    def _wind_down(self, record: ReplicaRecord, phase: str, why: str, now: float) -> None:
        record.phase = "draining" if phase == "draining" else "stopping"
        record.command_error = None
        if record.wound_down_at is None:
            record.wound_down_at = now
        self._event(record.deployment, "replica_draining" if phase == "draining"
                    else "replica_stopping", f"{record.name} on {record.host}: {why}", now,
                    replica=record.name)
        self._send(record, now)

    def _send(self, record: ReplicaRecord, now: float, resend: bool = False) -> None:
        """The command a record's phase calls for, to an online host; remembered as sent either
        way, so a host offline now gets it ``command_retry_s`` after it is back."""
        if record.phase != "active" and record.wound_down_at is None:  # a record from before
            record.wound_down_at = record.sent_at or now                # the field existed
        record.sent_at, record.sends = now, record.sends + 1
        self.store.save_replica(record)
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

    def _stop_orphans(self, now: float) -> None:
        """Replicas agents run for a deployment with no record here (a record given up while
        its host was away, a duplicate): stopped, a ready one drained first."""
        for host, state in self.fleet.hosts.items():
            if not state.online or state.telemetry is None:
                continue
            for s in state.telemetry.replicas:
                record = self.records.get(s.name)
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
                self._event(s.deployment, "orphan_stopped", f"{s.name} on {host} "
                            f"({s.state}) has no record here: {kind.value}", now,
                            replica=s.name, host=host, level="warning")
        if len(self._orphans) > 10_000:
            horizon = now - 10 * self.timing.retry_s
            self._orphans = {k: t for k, t in self._orphans.items() if t >= horizon}

    def _roll_back(self, d: Deployment, source: Revision, reason: str, by: str,
                   now: float) -> None:
        spec = msgspec.structs.replace(source.spec, replicas=d.spec.replicas,
                                       min_replicas=d.spec.min_replicas,
                                       max_replicas=d.spec.max_replicas)
        self._add_revision(d, source.model, source.runtime, spec, by, reason, now,
                           requested=source.requested, rolling_back=True,
                           phase="rolling_back", message=reason)
        self._event(d.name, "rollback_started", reason, now, version=source.version,
                    level="warning")

    def _mark_failed(self, d: Deployment, why: str) -> None:
        rev = self._revision(d)
        if rev.failed is None:
            failed = msgspec.structs.replace(rev, failed=why)
            self.store.save_revision(failed)
            self.revisions[d.name] = [failed if r.revision == rev.revision else r
                                      for r in self.revisions[d.name]]

    def _unavailable(self, source: Revision) -> str | None:
        """Why a revision cannot be rolled back to now (its version retired or deleted, its
        artifact gone), or None."""
        try:
            resolve(self.registry, source.version)
        except DeploymentError as exc:
            return exc.message
        art = source.model.artifact
        if art is not None and not self.registry.has_artifact(art.sha256):
            return f"its artifact {art.sha256[:12]} is no longer in the repository"
        return None

    def _back_off(self, d: Deployment, failed: list[tuple[str, str]], now: float) -> None:
        """Replicas failed: no new replica for a while (longer each time in a row), and not
        on the hosts they failed on while another fits."""
        d.failures += len(failed)
        d.last_failure = failed[-1][1]
        delay = _backoff_s(d.failures)
        d.backoff_until = now + delay
        for name, _ in failed:
            record = self.records.get(name)
            if record is not None:
                self._avoid[(d.name, record.host)] = now + AVOID_HOST_S
        self._touch(d, now)
        self._event(d.name, "backoff", f"{_plural(d.failures, 'replica failure')} in a row: "
                    f"no new replica for {delay:.0f} s", now, failures=d.failures,
                    level="warning")

    def _remove(self, d: Deployment, now: float) -> None:
        self.store.delete_deployment(d.name)
        del self.deployments[d.name]
        self.revisions.pop(d.name, None)
        self._baselines.pop(d.name, None)
        self._event(d.name, "deployment_deleted", "every replica stopped; deployment removed",
                    now)

    # -- the canary --------------------------------------------------------------------------

    def _judge_canary(self, d: Deployment, replica_views: list[ReplicaView],
                      now: float) -> bool:
        """Judge the canary once its window is over; whether that rolled the deployment back."""
        started, policy = d.canary_started_at, d.spec.rollback
        if started is None or d.canary_done or now < started + policy.observe_s:
            return False
        baseline = self._baselines.pop(d.name, {})
        old, new = Totals(), Totals()
        for v in replica_views:
            # One without a baseline (it had no counters when the window opened) would count
            # its whole life: left out.
            if v.phase != "active" or not v.ready or v.name not in baseline:
                continue
            delta = self.observer.totals(self.records[v.name]).since(baseline[v.name])
            if v.revision == d.revision:
                new += delta
            else:
                old += delta
        d.canary_done = True
        self._touch(d, now)
        version = self._revision(d).version
        stable = self._revision(d, d.stable).version if d.stable is not None else "old"
        verdict = judge(old, new, policy, stable, version)
        if verdict is None:
            enough = min(old.requests, new.requests) >= policy.min_requests
            self._event(d.name, "canary_passed" if enough else "canary_inconclusive",
                        f"{version} against {stable} over {policy.observe_s:.0f} s: "
                        f"{new.requests:.0f} and {old.requests:.0f} requests", now,
                        old_requests=old.requests, new_requests=new.requests)
            return False
        reason = f"automatic rollback from {version}: {verdict}"
        self._event(d.name, "canary_failed", verdict, now, level="warning",
                    old_requests=old.requests, new_requests=new.requests)
        if d.spec.rollback.auto and d.stable is not None:
            self._mark_failed(d, reason)
            self._roll_back(d, self._revision(d, d.stable), reason, "controller", now)
            return True
        d.failed = verdict
        self._mark_failed(d, verdict)
        return False

    def _view_of(self, r: ReplicaRecord) -> ReplicaView:
        size = r.spec.artifact.size_bytes if r.spec.artifact else 0
        deadline = (r.created_at + r.spec.ready_timeout_s + self.config.fetch_allowance_s
                    + size / self.config.fetch_bytes_per_s + self.config.command_retry_s)
        return self.observer.view(r, deadline)

    def _firing(self) -> list[Alert]:
        return list(self.firing())

    # -- bookkeeping -------------------------------------------------------------------------

    def _get(self, name: str, writable: bool = False) -> Deployment:
        d = self.deployments.get(name)
        if d is None:
            raise NotFound(f"no deployment named {name!r} (GET /api/v1/deployments lists them)")
        if writable and d.deleting:
            raise Conflict(f"deployment {name} is being deleted")
        return d

    def _records_of(self, name: str) -> list[ReplicaRecord]:
        return list(self._by_deployment.get(name, {}).values())

    def _keep(self, record: ReplicaRecord) -> None:
        self.records[record.name] = record
        self._by_deployment.setdefault(record.deployment, {})[record.name] = record

    def _drop(self, name: str) -> ReplicaRecord | None:
        record = self.records.pop(name, None)
        if record is not None:
            mine = self._by_deployment.get(record.deployment, {})
            mine.pop(name, None)
            if not mine:
                self._by_deployment.pop(record.deployment, None)
        return record

    def _new_name(self, d: Deployment) -> str:
        for _ in range(100):
            name = f"{d.name}-r{d.revision}-{self.suffix()}"
            if name not in self.records:
                return name
        raise DeploymentError(f"deployment {d.name}: no unused replica name found")

    def _revision(self, d: Deployment, number: int | None = None) -> Revision:
        wanted = d.revision if number is None else number
        found = self._find(d, wanted)
        if found is None:
            raise DeploymentError(f"deployment {d.name}: revision {wanted} is missing")
        return found

    def _find(self, d: Deployment, number: int | None) -> Revision | None:
        for r in reversed(self.revisions.get(d.name, [])):
            if r.revision == number:
                return r
        return None

    def _previous(self, d: Deployment) -> Revision | None:
        """The version before the current one: the latest other version that did not fail
        (a version rolled back from is never where a plain rollback goes)."""
        current = self._find(d, d.revision)
        if current is None:
            return None
        return next((r for r in reversed(self.revisions.get(d.name, []))
                     if r.revision < d.revision and r.version != current.version
                     and r.failed is None), None)

    def _check_feasible(self, name: str, spec: DeploymentSpec, model: ModelInfo,
                        runtime: str) -> None:
        hosts = [host_view(s, ()) for s in self.fleet.hosts.values()]
        if not any(h.online for h in hosts) or spec.replicas == 0:
            return  # nothing to judge against yet: placement says why when it cannot place
        request = PlacementRequest(name, runtime, spec.gpus_per_replica,
                                   gpu_need(spec, runtime, model, hosts))
        why = feasible(request, hosts)
        if why is not None:
            raise Invalid(f"deployment {name} cannot run anywhere: {why}")

    def _add_revision(self, d: Deployment, model: ModelInfo, runtime: str,
                      spec: DeploymentSpec, by: str, reason: str, now: float,
                      requested: str | None = None, **changes: Any) -> None:
        """A new revision made current: written in one transaction first, then kept in
        memory (a failed write changes nothing)."""
        revs = self.revisions.get(d.name, [])
        number = max((r.revision for r in revs), default=0) + 1
        rev = Revision(deployment=d.name, revision=number, version=model.ref,
                       requested=requested or spec.model, model=model, runtime=runtime,
                       spec=spec, created_at=now, by=by, reason=reason)
        key = _key(rev)
        # Replicas already running this very template (a rollback to it) become this
        # revision's: a rollback keeps the old replicas rather than replacing them.
        by_number = {r.revision: r for r in revs}
        relabelled = [r for r in self._records_of(d.name) if r.phase == "active"
                      and (old := by_number.get(r.revision)) is not None and _key(old) == key]
        fields: dict[str, Any] = {
            "spec": spec, "revision": number, "failed": None, "rolling_back": False,
            "canary_started_at": None, "canary_done": False, "refused": None,
            "failures": 0, "last_failure": None, "backoff_until": None, **changes}
        with self.store.transaction():
            self.store.save_revision(rev)
            for r in relabelled:
                self.store.save_replica(msgspec.structs.replace(r, revision=number))
            self.store.save_deployment(msgspec.structs.replace(d, updated_at=now, **fields))
        self.revisions.setdefault(d.name, []).append(rev)
        for r in relabelled:
            r.revision = number
        for field, value in fields.items():
            setattr(d, field, value)
        d.updated_at = now
        self._baselines.pop(d.name, None)

    def _save(self, d: Deployment, now: float, **changes: Any) -> None:
        """Changes to a deployment, written first, then kept in memory."""
        self.store.save_deployment(msgspec.structs.replace(d, updated_at=now, **changes))
        for field, value in changes.items():
            setattr(d, field, value)
        d.updated_at = now

    def _touch(self, d: Deployment, now: float) -> None:
        d.updated_at = now
        self.store.save_deployment(d)

    def _event(self, deployment: str, kind: str, message: str, now: float,
               level: str = "info", **data: Any) -> None:
        self.store.add_event(deployment, EventRow(ts=now, kind=kind, message=message,
                                                  data=data))
        getattr(log, level)(kind, deployment=deployment, message=message, **data)

    def view(self, name: str) -> dict[str, Any]:
        d = self.deployments[name]
        records = self._records_of(name)
        observed = {r.name: self.observer.observe(r) for r in records}
        previous = self._previous(d)
        return views.deployment(d, self._revision(d), previous, records, observed,
                                {h for h, s in self.fleet.hosts.items() if s.online})


def _key(rev: Revision) -> tuple[object, ...]:
    return revision_key(msgspec.structs.replace(rev.spec, runtime=rev.runtime), rev.version)


def _changes(current: Revision, spec: DeploymentSpec, version: str) -> str:
    parts = []
    if current.version != version:
        parts.append(f"model {current.version} -> {version}")
    before = msgspec.structs.replace(current.spec, runtime=current.runtime)
    for field in REVISION_FIELDS:
        a, b = getattr(before, field), getattr(spec, field)
        if a != b:
            parts.append(f"{field} {a!r} -> {b!r}")
    return ", ".join(parts)


def _backoff_s(failures: int) -> float:
    return min(BACKOFF_FIRST_S * 2.0 ** min(max(failures - 1, 0), 16), BACKOFF_MAX_S)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _shape(message: str) -> str:
    """A message with its figures blanked out."""
    return _FIGURES.sub("#", message)
