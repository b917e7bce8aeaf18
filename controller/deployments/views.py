"""The JSON the API answers with: deployments, revisions and events as plain builtins."""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any, Protocol

import msgspec

from llm_ops_helper.controller.deployments.store import (
    Deployment,
    EventRow,
    ReplicaRecord,
    Revision,
)


class Seen(Protocol):
    @property
    def state(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def url(self) -> str | None: ...
    @property
    def restarts(self) -> int: ...


def replica(r: ReplicaRecord, seen: Seen | None, online: bool) -> dict[str, Any]:
    state = seen.state if seen is not None else None
    if r.failed is not None:
        state = "failed"
    elif state is None or (r.phase != "active" and state == "ready"):
        state = {"active": "pending", "draining": "draining", "stopping": "stopping"}[r.phase]
    return {"name": r.name, "host": r.host, "gpus": r.gpus, "version": r.version,
            "revision": r.revision, "state": state,
            "reason": r.failed or (seen.reason if seen is not None else None),
            "url": seen.url if seen is not None else None,
            "restarts": seen.restarts if seen is not None else 0,
            "created_at": r.created_at, "phase": r.phase, "host_online": online}


def deployment(d: Deployment, rev: Revision, previous: Revision | None,
               records: list[ReplicaRecord], observed: Mapping[str, Seen | None],
               online: Set[str]) -> dict[str, Any]:
    replicas = [replica(r, observed.get(r.name), r.host in online)
                for r in sorted(records, key=lambda r: (r.revision, r.name))]
    ready = sum(1 for r, out in zip(sorted(records, key=lambda r: (r.revision, r.name)),
                                    replicas, strict=True)
                if r.phase == "active" and out["state"] == "ready" and out["host_online"])
    placement = [f"{r.name}: {r.why}" for r in records if r.phase == "active" and r.why]
    if d.refused is not None:
        placement.append(f"not placed: {d.refused}")
    return {"name": d.name, "spec": msgspec.to_builtins(d.spec), "revision": d.revision,
            "version": rev.version, "requested": rev.requested, "runtime": rev.runtime,
            "previous_version": previous.version if previous is not None else None,
            "phase": d.phase, "message": d.message, "desired": d.spec.replicas,
            "ready": ready, "replicas": replicas, "placement": placement,
            "created_at": d.created_at, "created_by": d.created_by,
            "updated_at": d.updated_at}


def revision(r: Revision) -> dict[str, Any]:
    return {"revision": r.revision, "version": r.version, "requested": r.requested,
            "runtime": r.runtime, "spec": msgspec.to_builtins(r.spec),
            "created_at": r.created_at, "by": r.by, "reason": r.reason, "failed": r.failed}


def event(e: EventRow) -> dict[str, Any]:
    return {"ts": e.ts, "kind": e.kind, "message": e.message, "data": e.data}
