"""Changes to what a deployment should be: the API's apply, scale, rollback and delete.

:class:`DesiredState` checks each change (the spec, a version the registry can resolve, a
fleet that could run it) and writes it, as a new revision where the replicas' template
changes; the reconcile passes carry it out.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from llm_ops_helper.controller.deployments.errors import Conflict, Invalid
from llm_ops_helper.controller.deployments.failures import Failures
from llm_ops_helper.controller.deployments.ledger import Ledger
from llm_ops_helper.controller.deployments.models import (
    ModelResolver,
    gpu_need,
    resolve,
    runtime_for,
)
from llm_ops_helper.controller.deployments.scheduler import PlacementRequest, feasible, host_view
from llm_ops_helper.controller.deployments.spec import (
    REVISION_FIELDS,
    DeploymentSpec,
    check_name,
    check_replicas,
    check_spec,
    revision_key,
)
from llm_ops_helper.controller.deployments.store import Deployment, ModelInfo, Revision
from llm_ops_helper.controller.fleet import Fleet


class DesiredState:
    def __init__(self, ledger: Ledger, fleet: Fleet, registry: ModelResolver,
                 failures: Failures, clock: Callable[[], float]) -> None:
        self.ledger = ledger
        self.fleet = fleet
        self.registry = registry
        self.failures = failures
        self.clock = clock

    def apply(self, name: str, spec: DeploymentSpec, by: str) -> bool:
        """Create or change a deployment; whether it was created."""
        check_name(name)
        check_spec(spec)
        d = self.ledger.deployments.get(name)
        if d is not None and d.deleting:
            raise Conflict(f"deployment {name} is being deleted; apply again once it is gone")
        model = resolve(self.registry, spec.model)
        runtime = runtime_for(spec, model)
        self.check_feasible(name, spec, model, runtime)
        now = self.clock()
        if d is None:
            d = Deployment(name=name, spec=spec, revision=0, created_at=now, updated_at=now,
                           created_by=by)
            # Written first: a failed write leaves nothing half-made in memory.
            self.ledger.add_revision(d, model, runtime, spec, by, f"created by {by}", now)
            self.ledger.deployments[name] = d
            self.ledger.event(name, "deployment_applied", f"created by {by}: {model.ref} x "
                              f"{spec.replicas} on {runtime}", now, version=model.ref, by=by)
            return True
        current = self.ledger.revision(d)
        before = msgspec.structs.replace(current.spec, runtime=current.runtime)
        after = msgspec.structs.replace(spec, runtime=runtime)
        if revision_key(before, current.version) != revision_key(after, model.ref) \
                or d.failed is not None:
            reason = f"{by} changed {_changes(current, after, model.ref) or 'nothing (retry)'}"
            self.ledger.add_revision(d, model, runtime, spec, by, reason, now)
            self.ledger.event(name, "rollout_started", f"revision {d.revision}: {reason}", now,
                              version=model.ref, by=by)
        else:
            old_replicas = d.spec.replicas
            self.ledger.save(d, now, spec=spec)
            self.ledger.event(name, "deployment_applied", f"{by} applied without a new "
                              f"revision (replicas {old_replicas} -> {spec.replicas})", now,
                              by=by)
        return False

    def scale(self, name: str, replicas: int, by: str) -> None:
        d = self.ledger.get(name, writable=True)
        check_replicas(d.spec, replicas)
        before, now = d.spec.replicas, self.clock()
        self.ledger.save(d, now, spec=msgspec.structs.replace(d.spec, replicas=replicas))
        self.ledger.event(name, "deployment_scaled", f"{by} scaled from {before} to "
                          f"{replicas}", now, replicas=replicas, by=by)

    def rollback(self, name: str, version: str | None, by: str) -> None:
        d = self.ledger.get(name, writable=True)
        current = self.ledger.revision(d)
        if version is None:
            source = self.ledger.previous(d)
            if source is None:
                raise Conflict(f"deployment {name} has no version before {current.version} "
                               "to roll back to")
        else:
            model = resolve(self.registry, version)
            if model.ref == current.version and d.failed is None:
                raise Conflict(f"deployment {name} already runs {model.ref}")
            source = next((r for r in reversed(self.ledger.revisions[name])
                           if r.version == model.ref), None)
            if source is None:  # never deployed here: the current spec on that version
                spec = msgspec.structs.replace(current.spec, model=version)
                runtime = runtime_for(spec, model)
                self.check_feasible(name, spec, model, runtime)
                source = msgspec.structs.replace(current, version=model.ref,
                                                 requested=version, model=model,
                                                 runtime=runtime, spec=spec)
        blocked = self.failures.unavailable(source)
        if blocked is not None:
            raise Conflict(f"deployment {name} cannot roll back to {source.version}: {blocked}")
        self.failures.roll_back(d, source, f"rollback to {source.version} by {by}", by,
                                self.clock())

    def delete(self, name: str, by: str) -> None:
        d = self.ledger.get(name)
        if not d.deleting:
            now = self.clock()
            self.ledger.save(d, now, deleting=True, phase="deleting",
                             message=f"deleted by {by}")
            self.ledger.event(name, "deployment_deleting", f"{by} deleted it; draining its "
                              "replicas", now, by=by)

    def check_feasible(self, name: str, spec: DeploymentSpec, model: ModelInfo,
                       runtime: str) -> None:
        hosts = [host_view(s, ()) for s in self.fleet.hosts.values()]
        if not any(h.online for h in hosts) or spec.replicas == 0:
            return  # nothing to judge against yet: placement says why when it cannot place
        request = PlacementRequest(name, runtime, spec.gpus_per_replica,
                                   gpu_need(spec, runtime, model, hosts))
        why = feasible(request, hosts)
        if why is not None:
            raise Invalid(f"deployment {name} cannot run anywhere: {why}")


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
