"""Alert lifecycle: conditions in, fired and resolved alerts out, de-duplicated by key.

Two kinds of condition reach the manager:

- *level* conditions, re-evaluated as a whole for one host and one group on every snapshot
  (``sync``): what is in the set fires (once), what left it resolves;
- *held* conditions from point events (an XID) or detections (an anomaly), which fire and stay
  firing until ``until`` passes with no new occurrence (``hold`` then ``expire``).

Every transition is written to SQLite before it goes to the sinks, so a restarted controller
picks up the alerts that were firing, and a sink that is down loses nothing (webhook
deliveries are rows of their own, retried from the database).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from llm_ops_helper.controller.rules import Condition
from llm_ops_helper.controller.store import Store
from llm_ops_helper.proto.messages import Alert

Sink = Callable[[Alert], None]

# Which group a persisted alert re-joins after a restart (held rules are not in a group).
RULE_GROUPS = {"host_offline": "host"}
HELD_RULES = frozenset({"gpu_xid", "anomaly"})


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
    fired_total: int = 0
    resolved_total: int = 0

    def restore(self) -> int:
        """Re-load the alerts that were firing when the controller stopped."""
        for alert, hold_until in self.store.firing():
            self.firing[alert.key] = alert
            if hold_until is not None:
                self._held[alert.key] = hold_until
            elif alert.host is not None:
                group = RULE_GROUPS.get(alert.rule, "telemetry")
                self._groups.setdefault((alert.host, group), set()).add(alert.key)
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
                self._resolve(key, ts)
        if keys or before:
            self._groups[(host, group)] = keys

    def hold(self, condition: Condition, until: float, ts: float) -> None:
        if condition.key not in self.firing:
            self._fire(condition, ts, until)
        elif until > self._held.get(condition.key, 0.0):
            self.store.save_alert(self.firing[condition.key], hold_until=until)
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
        self.store.save_alert(alert, hold_until)
        self._emit(alert)

    def _resolve(self, key: str, ts: float) -> None:
        alert = self.firing.pop(key, None)
        if alert is None:
            return
        resolved = msgspec.structs.replace(alert, state="resolved", ts=ts, resolved_at=ts)
        self.resolved_total += 1
        self.store.save_alert(resolved)
        self._emit(resolved)

    def _emit(self, alert: Alert) -> None:
        for sink in self.sinks:
            sink(alert)

    def counts(self) -> dict[str, int]:
        out = {"info": 0, "warning": 0, "critical": 0}
        for alert in self.firing.values():
            out[alert.severity] += 1
        return out
