"""Alert lifecycle: conditions in, fired and resolved alerts out, de-duplicated by key.

Two kinds of condition reach the manager:

- *level* conditions, re-evaluated as a whole for one host and one group on every snapshot
  (``sync``): what is in the set fires (once), what left it resolves;
- *held* conditions from point events (an XID) or detections (an anomaly), which fire and stay
  firing until ``until`` passes with no new occurrence (``hold`` then ``expire``).

Transitions are collected and :meth:`AlertManager.commit` (called a few times a second) writes
them to SQLite in one transaction, then hands them to the sinks: an alert storm across a rack
costs one commit, not one per alert. A restarted controller picks up the alerts that were
firing, and a sink that is down loses nothing (webhook deliveries are rows of their own,
retried from the database).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from llm_ops_helper.controller.rules import Condition
from llm_ops_helper.controller.store import Store
from llm_ops_helper.proto.messages import Alert

# A sink gets each batch of transitions once they are in SQLite; it must not block.
Sink = Callable[[list[Alert]], None]

# Which group a persisted alert re-joins after a restart (held rules are not in a group).
RULE_GROUPS = {"host_offline": "host"}
# Rules that hold only after some history (see AlertManager.restore).
SETTLING_RULES = frozenset({"gpu_throttled", "replica_down", "replica_restarting"})


def alert_id(key: str, started_at: float) -> str:
    digest = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:12]
    return f"{digest}-{int(started_at * 1000):x}"


@dataclass
class AlertManager:
    store: Store
    sinks: list[Sink] = field(default_factory=list)
    firing: dict[str, Alert] = field(default_factory=dict)
    _groups: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    _held: dict[str, float] = field(default_factory=dict)
    # (alert, hold deadline, whether the sinks should hear of it) since the last commit.
    _pending: list[tuple[Alert, float | None, bool]] = field(default_factory=list)
    fired_total: int = 0
    resolved_total: int = 0
    # Restored level alerts that may not resolve before this time (see restore).
    _restored: dict[str, float] = field(default_factory=dict)

    def restore(self, settle_until: float = 0.0) -> int:
        """Re-load the alerts that were firing when the controller stopped.

        Rules that need a little history (throttling sustained for a while, a replica past its
        start-up grace) cannot hold again until the restarted controller has seen that much:
        a restored alert of theirs would resolve on the first snapshot and fire anew. So a
        restored alert of those rules only resolves once ``settle_until`` has passed.
        """
        for alert, hold_until in self.store.firing():
            self.firing[alert.key] = alert
            if hold_until is not None:
                self._held[alert.key] = hold_until
            elif alert.host is not None:
                group = RULE_GROUPS.get(alert.rule, "telemetry")
                self._groups.setdefault((alert.host, group), set()).add(alert.key)
                if alert.rule in SETTLING_RULES:
                    self._restored[alert.key] = settle_until
        return len(self.firing)

    def sync(self, host: str, group: str, conditions: Iterable[Condition], ts: float) -> None:
        """``conditions`` is everything of ``group`` that holds for ``host`` now."""
        keys: set[str] = set()
        for condition in conditions:
            keys.add(condition.key)
            if condition.key not in self.firing:
                self._fire(condition, ts)
        before = self._groups.get((host, group))
        if before:
            for key in before - keys:
                if key in self._restored and ts < self._restored[key]:
                    keys.add(key)  # not yet: the rule's history is still being rebuilt
                    continue
                self._restored.pop(key, None)
                self._resolve(key, ts)
        if keys or before:
            self._groups[(host, group)] = keys

    def hold(self, condition: Condition, until: float, ts: float) -> None:
        if condition.key not in self.firing:
            self._fire(condition, ts, until)
        elif until > self._held.get(condition.key, 0.0):
            self._pending.append((self.firing[condition.key], until, False))
        self._held[condition.key] = max(until, self._held.get(condition.key, 0.0))

    def expire(self, ts: float) -> None:
        for key in [k for k, until in self._held.items() if until <= ts]:
            del self._held[key]
            self._resolve(key, ts)

    def _fire(self, c: Condition, ts: float, hold_until: float | None = None) -> None:
        alert = Alert(id=alert_id(c.key, ts), key=c.key, state="firing", severity=c.severity,
                      rule=c.rule, host=c.host, gpu=c.gpu, replica=c.replica, series=c.series,
                      summary=c.summary, value=c.value, ts=ts, started_at=ts)
        self.firing[c.key] = alert
        self.fired_total += 1
        self._pending.append((alert, hold_until, True))

    def _resolve(self, key: str, ts: float) -> None:
        alert = self.firing.pop(key, None)
        if alert is None:
            return
        resolved = msgspec.structs.replace(alert, state="resolved", ts=ts, resolved_at=ts)
        self.resolved_total += 1
        self._pending.append((resolved, None, True))

    def commit(self) -> int:
        """Persist the transitions since the last commit, then send them; how many."""
        if not self._pending:
            return 0
        pending = self._pending
        self.store.save_alerts([(alert, hold) for alert, hold, _ in pending])  # may raise: kept
        self._pending = []
        news = [alert for alert, _, is_news in pending if is_news]
        for sink in self.sinks:
            sink(news)
        return len(news)

    def counts(self) -> dict[str, int]:
        out = {"info": 0, "warning": 0, "critical": 0}
        for alert in self.firing.values():
            out[alert.severity] += 1
        return out
