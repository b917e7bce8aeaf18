"""What the deployment engine persists: deployments, their revisions, replica records, events.

SQLite (WAL), written on decisions only (a replica placed, a phase changed), never per
telemetry message. Everything a restarted controller needs to carry on is here: what each
replica of each deployment should run and where; what the replicas report comes back with the
agents' next telemetry. The tables carry their own schema version (``deployments_meta``), so the
file may be shared with other parts of the controller.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import msgspec

from llm_ops_helper.controller import database
from llm_ops_helper.controller.deployments.spec import DeploymentSpec
from llm_ops_helper.proto.messages import ReplicaSpec

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    updated_at REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS deployment_revisions (
    deployment TEXT NOT NULL,
    revision INTEGER NOT NULL,
    version TEXT NOT NULL,
    created_at REAL NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (deployment, revision)
);
CREATE TABLE IF NOT EXISTS deployment_replicas (
    name TEXT PRIMARY KEY,
    deployment TEXT NOT NULL,
    revision INTEGER NOT NULL,
    host TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS deployment_replicas_by_deployment ON deployment_replicas (deployment);
CREATE TABLE IF NOT EXISTS deployment_events (
    id INTEGER PRIMARY KEY,
    deployment TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS deployment_events_by_deployment ON deployment_events (deployment, id);
"""

Phase = Literal["progressing", "available", "degraded", "failed", "rolling_back", "deleting"]
RecordPhase = Literal["active", "draining", "stopping"]


class ArtifactInfo(msgspec.Struct, kw_only=True, frozen=True):
    sha256: str
    size_bytes: int
    filename: str


class ModelInfo(msgspec.Struct, kw_only=True, frozen=True):
    """A registry version as resolved when a revision was made (aliases move; this does not)."""

    model: str
    version: int
    ref: str
    runtime: str
    format: str
    artifact: ArtifactInfo | None = None
    source_uri: str | None = None


class Revision(msgspec.Struct, kw_only=True, frozen=True):
    deployment: str
    revision: int
    # The resolved version, "tiny@3", and what the user asked for ("tiny@production").
    version: str
    requested: str
    model: ModelInfo
    runtime: str
    spec: DeploymentSpec
    created_at: float
    by: str
    reason: str
    # Set when the revision's rollout failed (and was rolled back, or left failed).
    failed: str | None = None


class Deployment(msgspec.Struct, kw_only=True):
    """One deployment's desired state and where its rollout stands."""

    name: str
    spec: DeploymentSpec
    revision: int
    created_at: float
    updated_at: float
    created_by: str
    phase: Phase = "progressing"
    message: str = ""
    # The last revision whose rollout completed (all replicas ready, no older ones left).
    stable: int | None = None
    rolling_back: bool = False
    # The rollout of ``revision`` failed: no new replicas until the user changes something.
    failed: str | None = None
    deleting: bool = False
    # Canary comparison of the first new replica against the old ones.
    canary_started_at: float | None = None
    canary_done: bool = False
    # Why the last placement attempt left replicas unplaced (None: all placed).
    refused: str | None = None
    # Replicas that failed in a row (reset once available RECOVERED_AFTER_S after the last
    # failure, see failures.py), the last failure, and no new replica before ``backoff_until``.
    failures: int = 0
    last_failure: str | None = None
    backoff_until: float | None = None


class ReplicaRecord(msgspec.Struct, kw_only=True):
    """A replica the controller placed: the only record of where replicas should run."""

    name: str
    deployment: str
    revision: int
    version: str
    host: str
    gpus: list[int]
    spec: ReplicaSpec
    created_at: float
    phase: RecordPhase = "active"
    # The last command sent for it (deploy, then drain or stop) and when.
    sent_at: float = 0.0
    sends: int = 0
    # Controller-side failure (the agent refused the deploy, or it was never ready in time).
    failed: str | None = None
    ready_at: float | None = None
    why: str = ""
    # When it was first told to drain or stop (``sent_at`` moves with every resend).
    wound_down_at: float | None = None
    # The agent's error for the last drain or stop command, if it refused it.
    command_error: str | None = None


class EventRow(msgspec.Struct, kw_only=True, frozen=True):
    ts: float
    kind: str
    message: str
    data: dict[str, object] = {}


_enc = msgspec.json.encode
_deployment = msgspec.json.Decoder(Deployment)
_revision = msgspec.json.Decoder(Revision)
_record = msgspec.json.Decoder(ReplicaRecord)
_data = msgspec.json.Decoder(dict[str, object])


class DeploymentStoreError(RuntimeError):
    """The database cannot be used; the message names the file."""


class DeploymentStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = database.connect(path)
            self.db.executescript(_SCHEMA)
            row = self.db.execute(
                "SELECT value FROM deployments_meta WHERE key = 'schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO deployments_meta VALUES ('schema', ?)",
                                (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise DeploymentStoreError(f"{path}: deployment tables schema v{row[0]}; this "
                                           f"build reads v{SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise DeploymentStoreError(f"{path}: cannot open the deployments database: "
                                       f"{exc}") from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """The writes inside are kept together or not at all."""
        with self.db:
            self.db.execute("BEGIN")
            yield

    def deployments(self) -> list[Deployment]:
        rows = self.db.execute("SELECT body FROM deployments ORDER BY name")
        return [_deployment.decode(body) for (body,) in rows]

    def save_deployment(self, d: Deployment) -> None:
        self.db.execute("INSERT INTO deployments (name, updated_at, body) VALUES (?, ?, ?)"
                        " ON CONFLICT(name) DO UPDATE SET updated_at=excluded.updated_at,"
                        " body=excluded.body", (d.name, d.updated_at, _enc(d)))

    def delete_deployment(self, name: str) -> None:
        """The deployment, its revisions and replica records; its events stay (history)."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM deployments WHERE name = ?", (name,))
            self.db.execute("DELETE FROM deployment_revisions WHERE deployment = ?", (name,))
            self.db.execute("DELETE FROM deployment_replicas WHERE deployment = ?", (name,))

    def save_revision(self, r: Revision) -> None:
        self.db.execute("INSERT INTO deployment_revisions (deployment, revision, version,"
                        " created_at, body) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
                        " body=excluded.body",
                        (r.deployment, r.revision, r.version, r.created_at, _enc(r)))

    def revisions(self, deployment: str | None = None) -> list[Revision]:
        if deployment is None:
            rows = self.db.execute("SELECT body FROM deployment_revisions "
                                   "ORDER BY deployment, revision")
        else:
            rows = self.db.execute("SELECT body FROM deployment_revisions WHERE deployment = ?"
                                   " ORDER BY revision", (deployment,))
        return [_revision.decode(body) for (body,) in rows]

    def save_replica(self, r: ReplicaRecord) -> None:
        self.db.execute("INSERT INTO deployment_replicas (name, deployment, revision, host, body)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
                        " revision=excluded.revision, host=excluded.host, body=excluded.body",
                        (r.name, r.deployment, r.revision, r.host, _enc(r)))

    def delete_replica(self, name: str) -> None:
        self.db.execute("DELETE FROM deployment_replicas WHERE name = ?", (name,))

    def replicas(self) -> list[ReplicaRecord]:
        rows = self.db.execute("SELECT body FROM deployment_replicas ORDER BY name")
        return [_record.decode(body) for (body,) in rows]

    def add_event(self, deployment: str, event: EventRow) -> None:
        self.db.execute("INSERT INTO deployment_events (deployment, ts, kind, message, data)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (deployment, event.ts, event.kind, event.message, _enc(event.data)))

    def events(self, deployment: str, limit: int = 200) -> list[EventRow]:
        """The latest ``limit`` events of a deployment, oldest first."""
        rows = self.db.execute("SELECT ts, kind, message, data FROM deployment_events WHERE"
                               " deployment = ? ORDER BY id DESC LIMIT ?", (deployment, limit))
        return [EventRow(ts=ts, kind=kind, message=message, data=_data.decode(data))
                for ts, kind, message, data in reversed(rows.fetchall())]

    def prune_events(self, before: float) -> int:
        return self.db.execute("DELETE FROM deployment_events WHERE ts < ?", (before,)).rowcount
