"""Autoscaling decisions in SQLite, newest first per deployment, pruned by age.

One row per decision, the record as JSON (its inputs, forecast, capacity, rule and reason);
the table carries its own schema version (``autoscale_meta``) in the controller's shared file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import msgspec

from llm_ops_helper.controller import database

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS autoscale_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS autoscale_decisions (
    id INTEGER PRIMARY KEY,
    deployment TEXT NOT NULL,
    ts REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS autoscale_decisions_by_deployment
    ON autoscale_decisions (deployment, id);
"""


class DecisionStoreError(Exception):
    """The decisions table cannot be opened or used (the message names the file)."""


class DecisionStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = database.connect(path)
            with self.db:
                self.db.executescript(_SCHEMA)
                row = self.db.execute(
                    "SELECT value FROM autoscale_meta WHERE key = 'schema'").fetchone()
                if row is None:
                    self.db.execute("INSERT INTO autoscale_meta VALUES ('schema', ?)",
                                    (str(SCHEMA_VERSION),))
                elif int(row[0]) > SCHEMA_VERSION:
                    raise DecisionStoreError(
                        f"{path}: autoscale schema {row[0]} is newer than this controller's "
                        f"({SCHEMA_VERSION})")
        except (sqlite3.Error, OSError) as exc:
            raise DecisionStoreError(f"{path}: {exc}") from None

    def add(self, deployment: str, ts: float, record: dict[str, Any]) -> None:
        self.db.execute("INSERT INTO autoscale_decisions (deployment, ts, body) VALUES (?, ?, ?)",
                        (deployment, ts, msgspec.json.encode(record)))

    def decisions(self, deployment: str, limit: int = 100) -> list[bytes]:
        """The JSON records, newest first."""
        rows = self.db.execute("SELECT body FROM autoscale_decisions WHERE deployment = ? "
                               "ORDER BY id DESC LIMIT ?", (deployment, limit)).fetchall()
        return [bytes(r[0]) for r in rows]

    def prune(self, before: float) -> int:
        with self.db:
            return self.db.execute("DELETE FROM autoscale_decisions WHERE ts < ?",
                                   (before,)).rowcount

    def close(self) -> None:
        self.db.close()
