"""The deployment engine: desired state in, signed commands out, until the fleet matches.

:class:`Deployments` holds every deployment, its revisions and its replica records (the only
record of where replicas should run: the reconciler is their only writer), persisted in
SQLite (:mod:`.ledger`). The API's verbs check and write what a deployment should be
(:mod:`.desired`). Each pass (:meth:`Deployments.tick`) joins the records with what the agents
report (telemetry, and ``replica_state`` events, the newer of the two), judges a canary under
way (:mod:`.canary`), asks the pure planner what to do, and carries it out: replicas placed with
the scheduler, wound down and sent their commands (:mod:`.dispatch`), failures backed off or
rolled back (:mod:`.failures`); every decision is recorded as an event.
:meth:`Deployments.run` makes a pass every ``reconcile_interval_s`` and whenever something
changed (an apply, an event, a command result): news reconciles only the deployments it
concerns, and every deployment is looked at each interval.

What the controller does not know it leaves alone: after a restart, a replica whose host has
not reported since gets no stop, drain or resend; while the broker link is down (or nothing at
all has been heard since start-up) no host counts as lost. A replica that fails outside a
rollout is replaced after a backoff per deployment (10 s doubling to 5 min, reset once the
deployment is available), away from the host it failed on while another host fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

import llm_ops_helper.controller.deployments.views as views
from llm_ops_helper.controller.deployments.canary import Canary
from llm_ops_helper.controller.deployments.commands import CommandSender
from llm_ops_helper.controller.deployments.desired import DesiredState
from llm_ops_helper.controller.deployments.dispatch import Dispatcher
from llm_ops_helper.controller.deployments.failures import Failures
from llm_ops_helper.controller.deployments.ledger import Ledger
from llm_ops_helper.controller.deployments.models import ModelResolver
from llm_ops_helper.controller.deployments.observe import Observer
from llm_ops_helper.controller.deployments.rollout import Plan, ReplicaView, Timing, plan
from llm_ops_helper.controller.deployments.spec import DeploymentSpec
from llm_ops_helper.controller.deployments.store import (
    Deployment,
    DeploymentStore,
    ReplicaRecord,
    Revision,
)
from llm_ops_helper.controller.fleet import Fleet
from llm_ops_helper.proto.messages import Alert, CommandKind, CommandResult, Event

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
                 sender: CommandSender, artifact_url: Callable[[str, str], str],
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
        self.ledger = Ledger(store)
        # The broker link's state (the daemon's); when it last came up, None while down.
        self.link_up: Callable[[], bool] = lambda: True
        self._link_since: float | None = self.started_at
        self.observer = Observer(fleet, self.started_at, lambda: self._link_since)
        self.failures = Failures(self.ledger, registry)
        self.canary = Canary(self.ledger, self.observer, self.failures)
        self.ledger.on_reset = self.canary.forget
        self.desired = DesiredState(self.ledger, fleet, registry, self.failures, clock)
        # firing and suffix are read through the engine: whoever holds it may swap them.
        self.dispatch = Dispatcher(self.ledger, self.observer, fleet, sender, self.failures,
                                   self.timing, lambda: self.firing(), artifact_url,
                                   lambda: self.suffix(), self._again)
        # Deployments that news (an event, a command result) concerns: the next pass
        # reconciles only these, unless a full pass is due.
        self._dirty: set[str] = set()
        self._last_full = float("-inf")
        self.wake = asyncio.Event()
        self.ticks = 0
        self.tick_errors = 0
        self.canary.restart(self.started_at)

    @property
    def deployments(self) -> dict[str, Deployment]:
        return self.ledger.deployments

    @property
    def revisions(self) -> dict[str, list[Revision]]:
        return self.ledger.revisions

    @property
    def records(self) -> dict[str, ReplicaRecord]:
        return self.ledger.records

    # -- the API's verbs ---------------------------------------------------------------------

    def apply(self, name: str, spec: DeploymentSpec,
              by: str = "anonymous") -> tuple[dict[str, Any], bool]:
        """Create or change a deployment; (its view, whether it was created)."""
        created = self.desired.apply(name, spec, by)
        return self._settled(name), created

    def scale(self, name: str, replicas: int, by: str = "anonymous") -> dict[str, Any]:
        self.desired.scale(name, replicas, by)
        return self._settled(name)

    def rollback(self, name: str, version: str | None = None,
                 by: str = "anonymous") -> dict[str, Any]:
        self.desired.rollback(name, version, by)
        return self._settled(name)

    def delete(self, name: str, by: str = "anonymous") -> dict[str, Any]:
        self.desired.delete(name, by)
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
        self.ledger.get(name)
        return self.view(name)

    def list_views(self) -> list[dict[str, Any]]:
        return [self.view(name) for name in sorted(self.deployments)]

    def view(self, name: str) -> dict[str, Any]:
        d = self.deployments[name]
        records = self.ledger.records_of(name)
        observed = {r.name: self.observer.observe(r) for r in records}
        previous = self.ledger.previous(d)
        return views.deployment(d, self.ledger.revision(d), previous, records, observed,
                                {h for h, s in self.fleet.hosts.items() if s.online})

    def endpoints(self, name: str) -> list[dict[str, Any]]:
        self.ledger.get(name)
        out = []
        for r in self.ledger.records_of(name):
            seen = self.observer.observe(r)
            if r.phase == "active" and seen is not None and seen.state == "ready" and seen.url \
                    and self.observer.online(r.host):
                out.append({"replica": r.name, "host": r.host, "url": seen.url,
                            "version": r.version})
        return out

    def history(self, name: str, limit: int = 200) -> dict[str, Any]:
        return self.ledger.history(name, limit)

    def refs_in_use(self) -> set[str]:
        """The registry's ``in_use``: version refs a deployment runs or rolls to."""
        return set(self.versions_in_use())

    def versions_in_use(self) -> dict[str, list[str]]:
        """Model version ref -> the deployments running or rolling to it (for the registry's
        refusal to retire a version in use)."""
        return self.ledger.versions_in_use()

    # -- what agents say ---------------------------------------------------------------------

    def on_event(self, host: str, event: Event) -> None:
        """An event from an agent (ingest passes every one): replica_state news counts at
        once and wakes the loop."""
        record = self.records.get(event.replica or "")
        if record is not None and self.observer.on_event(host, event, self.clock()):
            self._again(record.deployment)

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
        self._again(record.deployment)

    def _again(self, name: str) -> None:
        """A pass over this deployment, at once."""
        self._dirty.add(name)
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
            self.dispatch.stop_orphans(now)
            self.observer.prune()
            self.failures.prune(now)

    def _track_link(self, now: float) -> None:
        if not self.link_up():
            self._link_since = None
        elif self._link_since is None:
            self._link_since = now

    def _reconcile(self, d: Deployment, now: float) -> None:
        records = self.ledger.records_of(d.name)
        replica_views = [self._view_of(r) for r in records]
        for r, v in zip(records, replica_views, strict=True):
            if v.state == "ready" and r.ready_at is None:
                r.ready_at = now
                self.store.save_replica(r)
                self.ledger.event(d.name, "replica_ready", f"{r.name} on {r.host} is ready",
                                  now, replica=r.name, host=r.host)
        if self.canary.judge(d, replica_views, now):  # rolled back: records relabelled
            replica_views = [self._view_of(r) for r in records]
        versions = {r.revision: r.version for r in self.revisions.get(d.name, [])}
        p = plan(d, replica_views, versions, now, self.timing)
        self._carry_out(d, p, now)

    def _carry_out(self, d: Deployment, p: Plan, now: float) -> None:
        self.dispatch.carry_out(d, p, now)
        if self.failures.carry_out(d, p, now):  # rolled back: the next pass plans afresh
            return
        if p.start_canary:
            self.canary.start(d, now)
        if p.completed:
            was_rollback = d.rolling_back
            d.stable, d.rolling_back = d.revision, False
            version = self.ledger.revision(d).version
            self.ledger.event(d.name, "rollback_completed" if was_rollback
                              else "rollout_completed",
                              f"revision {d.revision} ({version}) complete: {p.message}", now,
                              version=version)
        waiting = self.failures.waiting(d, now) if p.create else None
        if p.create and waiting is None:
            self.dispatch.place(d, p.create, now)
        if p.remove:
            self.ledger.remove(d, now)
            return
        message = p.message
        if d.refused is not None and p.create:
            message += f"; not placed: {d.refused}"
        if waiting is not None:
            p.phase = "degraded"
            message += f"; {waiting}"
        elif p.phase == "available":
            self.failures.recovered(d, now)
        refusals = [r.command_error for r in self.ledger.records_of(d.name)
                    if r.phase != "active" and r.command_error]
        if refusals:
            message += f"; {refusals[0]}"
        reason = self.ledger.revision(d).reason
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
            self.ledger.touch(d, now)
        elif p.completed or p.start_canary or p.fail_rollout:
            self.ledger.touch(d, now)

    def _view_of(self, r: ReplicaRecord) -> ReplicaView:
        size = r.spec.artifact.size_bytes if r.spec.artifact else 0
        deadline = (r.created_at + r.spec.ready_timeout_s + self.config.fetch_allowance_s
                    + size / self.config.fetch_bytes_per_s + self.config.command_retry_s)
        return self.observer.view(r, deadline)
