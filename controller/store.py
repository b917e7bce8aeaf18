"""The controller's SQLite database: alerts, their webhook deliveries, and anomaly detections.

One file in the state directory, WAL mode, written only on transitions (an alert firing or
resolving, a detection, a delivery attempt), never per telemetry message. ``user_version``
records the schema, so a file from another release is refused with a clear message rather
than misread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from llm_ops_helper.controller import database
from llm_ops_helper.proto.messages import Alert

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    state TEXT NOT NULL,
    rule TEXT NOT NULL,
    severity TEXT NOT NULL,
    host TEXT,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    hold_until REAL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_by_state ON alerts (state, started_at);
CREATE INDEX IF NOT EXISTS alerts_by_host ON alerts (host, started_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    alert_id TEXT NOT NULL,
    sink TEXT NOT NULL,
    state TEXT NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries (sink, state, id);
CREATE TABLE IF NOT EXISTS anomalies (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    host TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS anomalies_by_ts ON anomalies (ts);
"""

_encode = msgspec.json.encode
_alert = msgspec.json.Decoder(Alert)


class StoreError(RuntimeError):
    """The database cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    alert: Alert
    sink: str
    attempts: int
    next_at: float


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = database.connect(path)
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                # executescript commits first; every statement is idempotent, so a crash
                # half-way leaves a file the next start completes.
                self.db.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")
            elif version != SCHEMA_VERSION:
                raise StoreError(f"{path}: database schema v{version}; this build reads "
                                 f"v{SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the controller database: {exc}") from None

    def close(self) -> None:
        self.db.close()

    # alerts

    def save_alerts(self, alerts: list[tuple[Alert, float | None]]) -> None:
        """Write alert transitions (with their hold deadline) in one transaction."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO alerts (id, key, state, rule, severity, host, started_at,"
                " updated_at, hold_until, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET state=excluded.state,"
                " updated_at=excluded.updated_at, hold_until=excluded.hold_until,"
                " body=excluded.body",
                [(a.id, a.key, a.state, a.rule, a.severity, a.host, a.started_at or a.ts, a.ts,
                  hold, _encode(a)) for a, hold in alerts])

    def firing(self) -> Iterator[tuple[Alert, float | None]]:
        for body, hold in self.db.execute(
                "SELECT body, hold_until FROM alerts WHERE state = 'firing'"):
            yield _alert.decode(body), hold

    def alerts(self, state: str | None = None, host: str | None = None,
               limit: int = 100) -> list[Alert]:
        where, args = _filters(("state", state), ("host", host))
        rows = self.db.execute(f"SELECT body FROM alerts {where} ORDER BY started_at DESC "
                               "LIMIT ?", (*args, limit))
        return [_alert.decode(body) for (body,) in rows]

    # deliveries

    def add_deliveries(self, alerts: list[Alert], sink: str, now: float) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO deliveries (alert_id, sink, state, body, next_at)"
                                " VALUES (?, ?, 'pending', ?, ?)",
                                [(a.id, sink, _encode(a), now) for a in alerts])

    def due_deliveries(self, sink: str, now: float, limit: int = 100) -> list[Delivery]:
        """The oldest pending deliveries of ``sink``, if the oldest one is due.

        Head-of-line: while the oldest waits for its retry, newer ones wait behind it, so a
        receiver sees a resolve after its firing, never before.
        """
        rows = self.db.execute(
            "SELECT id, body, attempts, next_at FROM deliveries WHERE state = 'pending'"
            " AND sink = ? ORDER BY id LIMIT ?", (sink, limit)).fetchall()
        if not rows or rows[0][3] > now:
            return []
        return [Delivery(i, _alert.decode(b), sink, n, t) for i, b, n, t in rows]

    def next_delivery_at(self, sink: str) -> float | None:
        row = self.db.execute("SELECT next_at FROM deliveries WHERE state = 'pending'"
                              " AND sink = ? ORDER BY id LIMIT 1", (sink,)).fetchone()
        return row[0] if row else None

    def delivered(self, ids: list[int], now: float) -> None:
        self.db.executemany("UPDATE deliveries SET state = 'delivered', delivered_at = ?,"
                            " attempts = attempts + 1 WHERE id = ?", [(now, i) for i in ids])

    def failed(self, ids: list[int], error: str) -> None:
        """Give up on deliveries the receiver refused for good (kept, with the reason)."""
        self.db.executemany("UPDATE deliveries SET state = 'failed', attempts = attempts + 1,"
                            " last_error = ? WHERE id = ?", [(error, i) for i in ids])

    def alert(self, alert_id: str) -> Alert | None:
        row = self.db.execute("SELECT body FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        return _alert.decode(row[0]) if row else None

    def retry(self, ids: list[int], error: str, next_at: float) -> None:
        self.db.executemany("UPDATE deliveries SET attempts = attempts + 1, last_error = ?,"
                            " next_at = ? WHERE id = ?", [(error, next_at, i) for i in ids])

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        rows = self.db.execute("SELECT sink, state, COUNT(*) FROM deliveries GROUP BY 1, 2")
        return {(sink, state): n for sink, state, n in rows}

    def prune(self, before: float) -> int:
        """Forget resolved alerts, finished deliveries and detections older than ``before``.

        Firing alerts and pending deliveries are kept whatever their age.
        """
        removed = 0
        with self.db:
            self.db.execute("BEGIN")
            for statement in _prune_sql():
                removed += self.db.execute(statement, (before,)).rowcount
        return removed

    # anomalies

    def add_anomalies(self, rows: list[tuple[float, str, bytes]]) -> None:
        self.db.executemany("INSERT INTO anomalies (ts, host, body) VALUES (?, ?, ?)", rows)

    def anomalies(self, host: str | None = None, since: float | None = None,
                  limit: int = 100) -> list[bytes]:
        where, args = _filters(("host", host))
        if since is not None:
            where += (" AND" if where else "WHERE") + " ts >= ?"
            args.append(since)
        rows = self.db.execute(f"SELECT body FROM anomalies {where} ORDER BY ts DESC LIMIT ?",
                               (*args, limit))
        return [body for (body,) in rows]


def _prune_sql() -> tuple[str, ...]:
    return (
        "DELETE FROM alerts WHERE state = 'resolved' AND updated_at < ?",
        "DELETE FROM deliveries WHERE state != 'pending' AND next_at < ?",
        "DELETE FROM anomalies WHERE ts < ?",
    )


def _filters(*pairs: tuple[str, str | None]) -> tuple[str, list[object]]:
    # Column names come from this module only; values are always bound parameters.
    clauses = [f"{column} = ?" for column, value in pairs if value is not None]
    args: list[object] = [value for _, value in pairs if value is not None]
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args
