"""What the deployment engine knows: every deployment, its revisions and its replica records.

:class:`Ledger` keeps them in memory and in SQLite; every change is written first, then kept,
so that a failed write changes nothing. The replica records are the only record of where
replicas should run, and the engine is their only writer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import structlog

import llm_ops_helper.controller.deployments.views as views
from llm_ops_helper.controller.deployments.errors import Conflict, DeploymentError, NotFound
from llm_ops_helper.controller.deployments.spec import DeploymentSpec, revision_key
from llm_ops_helper.controller.deployments.store import (
    Deployment,
    DeploymentStore,
    EventRow,
    ModelInfo,
    ReplicaRecord,
    Revision,
)

log = structlog.get_logger("llmops.controller.deployments")


class Ledger:
    def __init__(self, store: DeploymentStore) -> None:
        self.store = store
        self.deployments = {d.name: d for d in store.deployments()}
        self.revisions: dict[str, list[Revision]] = {}
        for r in store.revisions():
            self.revisions.setdefault(r.deployment, []).append(r)
        self.records: dict[str, ReplicaRecord] = {}
        # Deployment -> its records by name: one deployment's pass reads only its own.
        self._by_deployment: dict[str, dict[str, ReplicaRecord]] = {}
        for record in store.replicas():
            self.keep(record)
        # Told a deployment's name when what is kept in memory about its rollout no longer
        # applies (a new revision, the deployment removed): the canary's baselines.
        self.on_reset: Callable[[str], None] = lambda name: None

    # -- deployments -------------------------------------------------------------------------

    def get(self, name: str, writable: bool = False) -> Deployment:
        d = self.deployments.get(name)
        if d is None:
            raise NotFound(f"no deployment named {name!r} (GET /api/v1/deployments lists them)")
        if writable and d.deleting:
            raise Conflict(f"deployment {name} is being deleted")
        return d

    def save(self, d: Deployment, now: float, **changes: Any) -> None:
        """Changes to a deployment, written first, then kept in memory."""
        self.store.save_deployment(msgspec.structs.replace(d, updated_at=now, **changes))
        for field, value in changes.items():
            setattr(d, field, value)
        d.updated_at = now

    def touch(self, d: Deployment, now: float) -> None:
        d.updated_at = now
        self.store.save_deployment(d)

    def remove(self, d: Deployment, now: float) -> None:
        self.store.delete_deployment(d.name)
        del self.deployments[d.name]
        self.revisions.pop(d.name, None)
        self.on_reset(d.name)
        self.event(d.name, "deployment_deleted", "every replica stopped; deployment removed",
                   now)

    def event(self, deployment: str, kind: str, message: str, now: float,
              level: str = "info", **data: Any) -> None:
        self.store.add_event(deployment, EventRow(ts=now, kind=kind, message=message,
                                                  data=data))
        getattr(log, level)(kind, deployment=deployment, message=message, **data)

    def history(self, name: str, limit: int = 200) -> dict[str, Any]:
        if name not in self.deployments and not self.store.events(name, 1):
            raise NotFound(f"no deployment named {name!r} (GET /api/v1/deployments lists them)")
        return {"revisions": [views.revision(r) for r in self.revisions.get(name, [])],
                "events": [views.event(e) for e in self.store.events(name, limit)]}

    # -- replica records ---------------------------------------------------------------------

    def records_of(self, name: str) -> list[ReplicaRecord]:
        return list(self._by_deployment.get(name, {}).values())

    def keep(self, record: ReplicaRecord) -> None:
        self.records[record.name] = record
        self._by_deployment.setdefault(record.deployment, {})[record.name] = record

    def drop(self, name: str) -> ReplicaRecord | None:
        record = self.records.pop(name, None)
        if record is not None:
            mine = self._by_deployment.get(record.deployment, {})
            mine.pop(name, None)
            if not mine:
                self._by_deployment.pop(record.deployment, None)
        return record

    def new_name(self, d: Deployment, suffix: Callable[[], str]) -> str:
        for _ in range(100):
            name = f"{d.name}-r{d.revision}-{suffix()}"
            if name not in self.records:
                return name
        raise DeploymentError(f"deployment {d.name}: no unused replica name found")

    # -- revisions ---------------------------------------------------------------------------

    def revision(self, d: Deployment, number: int | None = None) -> Revision:
        wanted = d.revision if number is None else number
        found = self.find(d, wanted)
        if found is None:
            raise DeploymentError(f"deployment {d.name}: revision {wanted} is missing")
        return found

    def find(self, d: Deployment, number: int | None) -> Revision | None:
        for r in reversed(self.revisions.get(d.name, [])):
            if r.revision == number:
                return r
        return None

    def previous(self, d: Deployment) -> Revision | None:
        """The version before the current one: the latest other version that did not fail
        (a version rolled back from is never where a plain rollback goes)."""
        current = self.find(d, d.revision)
        if current is None:
            return None
        return next((r for r in reversed(self.revisions.get(d.name, []))
                     if r.revision < d.revision and r.version != current.version
                     and r.failed is None), None)

    def versions_in_use(self) -> dict[str, list[str]]:
        """Model version ref -> the deployments running or rolling to it (for the registry's
        refusal to retire a version in use)."""
        used: dict[str, set[str]] = {}
        for d in self.deployments.values():
            # What it runs, the last version that completed, and where a plain rollback goes:
            # their artifacts must stay.
            for rev in (self.find(d, d.revision), self.find(d, d.stable), self.previous(d)):
                if rev is not None:
                    used.setdefault(rev.version, set()).add(d.name)
        for r in self.records.values():
            used.setdefault(r.version, set()).add(r.deployment)
        return {ref: sorted(names) for ref, names in used.items()}

    def add_revision(self, d: Deployment, model: ModelInfo, runtime: str,
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
        relabelled = [r for r in self.records_of(d.name) if r.phase == "active"
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
        self.on_reset(d.name)

    def mark_failed(self, d: Deployment, why: str) -> None:
        """The current revision's rollout failed (kept in its history)."""
        rev = self.revision(d)
        if rev.failed is None:
            failed = msgspec.structs.replace(rev, failed=why)
            self.store.save_revision(failed)
            self.revisions[d.name] = [failed if r.revision == rev.revision else r
                                      for r in self.revisions[d.name]]


def _key(rev: Revision) -> tuple[object, ...]:
    return revision_key(msgspec.structs.replace(rev.spec, runtime=rev.runtime), rev.version)
