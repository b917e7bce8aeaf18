"""Where alerts go: the log, the ``llmops/v1/alerts`` topic, and webhooks.

Sinks are called synchronously on every transition and must never block: the log writes a
line, MQTT puts the alert on a bounded queue the broker session drains, and a webhook only
inserts a delivery row into SQLite and wakes its :class:`WebhookSender`, which posts in
Alertmanager's JSON (the ``webhook_config`` payload, version 4, or an Alertmanager's own
``/api/v2/alerts``) and retries with capped exponential backoff from the database.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog

from llm_ops_helper.controller.config import WebhookConfig
from llm_ops_helper.controller.store import Delivery, Store
from llm_ops_helper.proto.messages import Alert

log = structlog.get_logger("llmops.controller.alerts")

# Alertmanager's "no end time yet".
_ZERO_TIME = "0001-01-01T00:00:00Z"


def log_sink(alerts: list[Alert]) -> None:
    for alert in alerts:
        event = "alert_fired" if alert.state == "firing" else "alert_resolved"
        log.warning(event, alert_id=alert.id, rule=alert.rule, severity=alert.severity,
                    host=alert.host, gpu=alert.gpu, replica=alert.replica, series=alert.series,
                    summary=alert.summary)


class MqttSink:
    """Alerts for the broker session to publish; the oldest are dropped (and counted) if the
    broker stays away long enough to fill the queue: SQLite still has every one."""

    def __init__(self, limit: int = 10_000) -> None:
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(limit)
        self.dropped = 0

    def __call__(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            if self.queue.full():
                self.queue.get_nowait()
                self.dropped += 1
            self.queue.put_nowait(alert)


def _rfc3339(ts: float | None) -> str:
    if ts is None:
        return _ZERO_TIME
    try:
        moment = datetime.fromtimestamp(ts, UTC)
    except (ValueError, OverflowError, OSError):  # ingest refuses such times; be sure anyway
        return _ZERO_TIME
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def labels(alert: Alert) -> dict[str, str]:
    out = {"alertname": alert.rule, "severity": alert.severity, "source": "llmops"}
    for name, value in (("host", alert.host), ("gpu", alert.gpu), ("replica", alert.replica),
                        ("series", alert.series)):
        if value is not None:
            out[name] = str(value)
    return out | alert.labels


def alertmanager_alert(alert: Alert, external_url: str) -> dict[str, Any]:
    """One alert as Alertmanager's API and webhook payloads carry it."""
    return {
        "status": alert.state,
        "labels": labels(alert),
        "annotations": {"summary": alert.summary},
        "startsAt": _rfc3339(alert.started_at or alert.ts),
        "endsAt": _rfc3339(alert.resolved_at),
        "generatorURL": f"{external_url.rstrip('/')}/api/v1/alerts?id={alert.id}"
                        if external_url else "",
        "fingerprint": alert.id.split("-")[0],
    }


def webhook_payload(alerts: list[Alert], external_url: str,
                    receiver: str = "llmops") -> dict[str, Any]:
    """Alertmanager's ``webhook_config`` body (version 4) for alerts of one group."""
    items = [alertmanager_alert(a, external_url) for a in alerts]
    common = dict(items[0]["labels"])
    for item in items[1:]:
        common = {k: v for k, v in common.items() if item["labels"].get(k) == v}
    status = "firing" if any(a.state == "firing" for a in alerts) else "resolved"
    common_annotations = dict(items[0]["annotations"]) if len(items) == 1 else {}
    return {
        "version": "4",
        "groupKey": '{}:{alertname="' + alerts[0].rule + '"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": {"alertname": alerts[0].rule},
        "commonLabels": common,
        "commonAnnotations": common_annotations,
        "externalURL": external_url,
        "alerts": items,
    }


class WebhookSender:
    """Delivers one webhook's alerts from SQLite, oldest first, retrying with backoff."""

    def __init__(self, config: WebhookConfig, store: Store, external_url: str = "") -> None:
        self.config = config
        self.store = store
        self.external_url = external_url
        self.name = f"webhook:{config.url}"
        self._wake = asyncio.Event()
        self.delivered = 0
        self.failures = 0

    def __call__(self, alerts: list[Alert]) -> None:
        if alerts:
            self.store.add_deliveries(alerts, self.name, time.time())
            self._wake.set()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    due = self.store.due_deliveries(self.name, time.time())
                    if due:
                        await self._send(session, due)
                        continue
                    next_at = self.store.next_delivery_at(self.name)
                except sqlite3.Error as exc:  # a locked or full database: wait, try again
                    log.error("webhook_store_error", url=self.config.url, error=str(exc))
                    await asyncio.sleep(self.config.retry_min_s)
                    continue
                self._wake.clear()
                try:
                    wait = None if next_at is None else max(0.0, next_at - time.time())
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass

    def _body(self, due: list[Delivery]) -> Any:
        alerts = [d.alert for d in due]
        if self.config.format == "alertmanager":
            return [alertmanager_alert(a, self.external_url) for a in alerts]
        return webhook_payload(alerts, self.external_url)

    async def _send(self, session: aiohttp.ClientSession, due: list[Delivery]) -> None:
        # Alertmanager's API takes any list; a webhook notification is one group, and here a
        # group is a run of consecutive alerts of one rule and state (order is kept).
        batches = [due] if self.config.format == "alertmanager" else _groups(due)
        for batch in batches:
            ids = [d.id for d in batch]
            try:
                async with session.post(self.config.url, json=self._body(batch)) as response:
                    if response.status in _PERMANENT:
                        # The receiver refuses this body and always will: retrying would hold
                        # every later alert behind it. Kept in SQLite with the reason.
                        text = (await response.text())[:200]
                        self.store.failed(ids, f"HTTP {response.status}: {text}")
                        self.failures += 1
                        log.error("webhook_refused", url=self.config.url,
                                  status=response.status, alerts=len(batch), body=text)
                        continue
                    if response.status >= 300:
                        raise _Failed(f"HTTP {response.status}")
            except (aiohttp.ClientError, TimeoutError, _Failed) as exc:
                attempts = batch[0].attempts + 1
                delay = min(self.config.retry_max_s,
                            self.config.retry_min_s * 2.0 ** min(attempts - 1, 30))
                error = str(exc) or type(exc).__name__
                self.store.retry(ids, error, time.time() + delay)
                self.failures += 1
                log.warning("webhook_failed", url=self.config.url, error=error,
                            attempts=attempts, retry_in_s=round(delay, 1), alerts=len(batch))
                return  # keep order: nothing newer goes out before this one
            self.store.delivered(ids, time.time())
            self.delivered += len(batch)


class _Failed(Exception):
    pass


# 4xx answers that say "this request will never work": bad request, auth, not found, too big.
# 408 (timeout) and 429 (slow down) are worth retrying, as are 5xx.
_PERMANENT = frozenset({400, 401, 403, 404, 405, 410, 413, 415, 422})


def _groups(due: list[Delivery], limit: int = 100) -> list[list[Delivery]]:
    out: list[list[Delivery]] = []
    for d in due:
        last = out[-1] if out else None
        if (last is not None and len(last) < limit and last[0].alert.rule == d.alert.rule
                and last[0].alert.state == d.alert.state):
            last.append(d)
        else:
            out.append([d])
    return out
