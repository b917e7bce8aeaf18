"""The deployment tables: round trips, deletion, a schema from another release refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from llm_ops_helper.controller.deployments.spec import DeploymentSpec
from llm_ops_helper.controller.deployments.store import (
    ArtifactInfo,
    Deployment,
    DeploymentStore,
    DeploymentStoreError,
    EventRow,
    ModelInfo,
    ReplicaRecord,
    Revision,
)
from llm_ops_helper.proto.messages import ArtifactRef, ReplicaSpec

MODEL = ModelInfo(model="tiny", version=3, ref="tiny@3", runtime="sim", format="sim",
                  artifact=ArtifactInfo(sha256="ab" * 32, size_bytes=27,
                                        filename="model-card.toml"))


def test_everything_round_trips_through_a_reopened_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "controller.db"
    store = DeploymentStore(path)
    spec = DeploymentSpec(model="tiny@production", replicas=3, args=["--x"])
    d = Deployment(name="chat", spec=spec, revision=1, created_at=1.0, updated_at=2.0,
                   created_by="alice", phase="available", stable=1, message="3/3 ready")
    rev = Revision(deployment="chat", revision=1, version="tiny@3",
                   requested="tiny@production", model=MODEL, runtime="sim", spec=spec,
                   created_at=1.0, by="alice", reason="created by alice")
    replica = ReplicaRecord(
        name="chat-r1-abcdef", deployment="chat", revision=1, version="tiny@3",
        host="host-a", gpus=[0, 1], created_at=1.5, sent_at=1.5, sends=1,
        spec=ReplicaSpec(name="chat-r1-abcdef", deployment="chat", version="tiny@3",
                         runtime="sim", gpus=[0, 1],
                         artifact=ArtifactRef(sha256="ab" * 32, size_bytes=27,
                                              url="http://head/a")))
    store.save_deployment(d)
    store.save_revision(rev)
    store.save_replica(replica)
    store.add_event("chat", EventRow(ts=1.0, kind="deployment_applied", message="hi",
                                     data={"by": "alice"}))
    store.close()

    again = DeploymentStore(path)
    assert again.deployments() == [d]
    assert again.revisions("chat") == [rev] and again.revisions() == [rev]
    assert again.replicas() == [replica]
    assert again.events("chat") == [EventRow(ts=1.0, kind="deployment_applied", message="hi",
                                             data={"by": "alice"})]
    replica.phase = "draining"
    again.save_replica(replica)
    assert again.replicas()[0].phase == "draining"
    replica.revision = 2  # relabelled by a rollback to its template: the column follows
    again.save_replica(replica)
    assert again.db.execute("SELECT revision FROM deployment_replicas").fetchall() == [(2,)]
    again.delete_replica(replica.name)
    assert again.replicas() == []
    again.save_replica(replica)
    again.delete_deployment("chat")
    assert (again.deployments(), again.revisions(), again.replicas()) == ([], [], [])
    assert len(again.events("chat")) == 1  # history outlives the deployment


def test_events_newest_limit_oldest_first_and_pruned(tmp_path: Path) -> None:
    store = DeploymentStore(tmp_path / "d.db")
    for i in range(5):
        store.add_event("chat", EventRow(ts=float(i), kind="k", message=str(i)))
    assert [e.message for e in store.events("chat", limit=2)] == ["3", "4"]
    assert store.prune_events(before=3.0) == 3
    assert [e.message for e in store.events("chat")] == ["3", "4"]


def test_other_schema_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    DeploymentStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE deployments_meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(DeploymentStoreError, match=f"{path}: deployment tables schema v99"):
        DeploymentStore(path)
