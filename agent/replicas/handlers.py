"""The replica and artifact commands: decode the body, call the supervisor, answer fast.

Anything slow (a download, a start-up, a drain) goes on in the background: commands are
handled one at a time, and the controller follows progress through ``replica_state`` and
``artifact_*`` events and telemetry.
"""

from __future__ import annotations

from typing import Any

from llm_ops_helper.agent.commands import CommandFailed, Handler, body_as
from llm_ops_helper.agent.replicas.artifacts import ArtifactError
from llm_ops_helper.agent.replicas.supervisor import DeployError, Supervisor
from llm_ops_helper.proto.messages import (
    ArtifactRef,
    Command,
    CommandKind,
    EvictArtifact,
    ReplicaSpec,
    StopReplica,
)


def replica_handlers(supervisor: Supervisor) -> dict[str, Handler]:
    async def deploy_replica(command: Command) -> dict[str, Any]:
        try:
            return await supervisor.deploy(body_as(command, ReplicaSpec))
        except DeployError as exc:
            raise CommandFailed(str(exc)) from None

    async def stop_replica(command: Command) -> dict[str, Any]:
        body = body_as(command, StopReplica)
        return await supervisor.stop(body.name, drain=body.drain, timeout_s=body.timeout_s)

    async def drain_replica(command: Command) -> dict[str, Any]:
        body = body_as(command, StopReplica)
        return await supervisor.stop(body.name, drain=True, timeout_s=body.timeout_s)

    async def fetch_artifact(command: Command) -> dict[str, Any]:
        ref = body_as(command, ArtifactRef)
        try:
            return {"sha256": ref.sha256, "state": supervisor.cache.prefetch(ref)}
        except ArtifactError as exc:
            raise CommandFailed(str(exc)) from None

    async def evict_artifact(command: Command) -> dict[str, Any]:
        body = body_as(command, EvictArtifact)
        try:
            return {"sha256": body.sha256, "evicted": supervisor.cache.evict(body.sha256)}
        except ArtifactError as exc:
            raise CommandFailed(str(exc)) from None

    return {
        CommandKind.DEPLOY_REPLICA: deploy_replica,
        CommandKind.STOP_REPLICA: stop_replica,
        CommandKind.DRAIN_REPLICA: drain_replica,
        CommandKind.FETCH_ARTIFACT: fetch_artifact,
        CommandKind.EVICT_ARTIFACT: evict_artifact,
    }
