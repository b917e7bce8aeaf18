"""Usage per key and model: counted in memory, written to SQLite in batches, and on /metrics.

The table keeps one row per hour, key and model: ``usage(hour, key, model, requests,
prompt_tokens, completion_tokens)``; :meth:`Meter.flush` adds what was counted since the last.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter

log = structlog.get_logger("llmops.gateway.metering")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    hour INTEGER NOT NULL,
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, key, model)
)
"""
_ADD = """
INSERT INTO usage (hour, key, model, requests, prompt_tokens, completion_tokens)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (hour, key, model) DO UPDATE SET
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = PromCounter("llmops_gateway_requests", "Requests answered",
                                    ["key", "model", "status"], registry=r)
        self.tokens = PromCounter("llmops_gateway_tokens", "Tokens used",
                                  ["key", "model", "kind"], registry=r)
        self.guard_actions = PromCounter("llmops_gateway_guard_actions",
                                         "Guard decisions other than allow",
                                         ["check", "action"], registry=r)
        self.upstream_errors = PromCounter("llmops_gateway_upstream_errors",
                                           "Backend failures", ["model", "kind"], registry=r)
        self.latency = Histogram("llmops_gateway_request_seconds",
                                 "Time to the end of the answer", ["model"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30,
                                          60, 120))


class Meter:
    """Counts usage; :meth:`flush` writes it (in a worker thread, one transaction a batch)."""

    def __init__(self, path: Path, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.metrics, self.clock = path, metrics, clock
        with self._connect() as db:
            db.execute(_SCHEMA)
        self._pending: Counter[tuple[int, str, str, str]] = Counter()
        # The labelled series of each (key, model, status), looked up once: labels() takes a
        # lock and builds a tuple, on every request otherwise. Keys, models and statuses are
        # few (configured keys, deployments, HTTP codes), so this stays small.
        self._series: dict[tuple[str, str, int], tuple[PromCounter, PromCounter,
                                                       PromCounter]] = {}

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def record(self, key: str, model: str, status: int, prompt: int, completion: int) -> None:
        if (series := self._series.get((key, model, status))) is None:
            m = self.metrics
            series = self._series[key, model, status] = (
                m.requests.labels(key, model, str(status)), m.tokens.labels(key, model, "prompt"),
                m.tokens.labels(key, model, "completion"))
        requests, prompt_tokens, completion_tokens = series
        requests.inc()
        if prompt:
            prompt_tokens.inc(prompt)
        if completion:
            completion_tokens.inc(completion)
        hour = int(self.clock()) // 3600 * 3600
        self._pending[(hour, key, model, "requests")] += 1
        self._pending[(hour, key, model, "prompt")] += prompt
        self._pending[(hour, key, model, "completion")] += completion

    def _write(self, batch: Counter[tuple[int, str, str, str]]) -> None:
        rows: dict[tuple[int, str, str], list[int]] = {}
        for (hour, key, model, kind), n in batch.items():
            row = rows.setdefault((hour, key, model), [0, 0, 0])
            row[("requests", "prompt", "completion").index(kind)] += n
        with self._connect() as db:
            db.executemany(_ADD, [(*k, *v) for k, v in rows.items()])
        db.close()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, Counter()
        try:
            await asyncio.to_thread(self._write, batch)
        except sqlite3.Error as exc:
            log.error("usage_write_failed", error=str(exc))
            self._pending.update(batch)  # kept for the next try

    async def run(self, stop: asyncio.Event, every_s: float) -> None:
        try:
            while not stop.is_set():
                try:
                    async with asyncio.timeout(every_s):
                        await stop.wait()
                except TimeoutError:
                    pass
                await self.flush()
        finally:
            await asyncio.shield(self.flush())

    def usage(self) -> list[tuple[str, str, int, int, int]]:
        """(key, model, requests, prompt, completion) summed over all hours (tests, reports)."""
        with self._connect() as db:
            rows = db.execute("SELECT key, model, SUM(requests), SUM(prompt_tokens), "
                              "SUM(completion_tokens) FROM usage GROUP BY key, model "
                              "ORDER BY key, model").fetchall()
        db.close()
        return [tuple(r) for r in rows]
