from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from llm_ops_helper.controller.alerts import AlertManager
from llm_ops_helper.controller.rules import Condition
from llm_ops_helper.controller.store import Store, StoreError
from llm_ops_helper.proto.messages import Alert

HOT = Condition("gpu_temperature_high", "warning", "h1", "GPU 0 at 91 C", gpu=0, value=91.0)
ECC = Condition("gpu_ecc_uncorrected", "critical", "h1", "GPU 1 ECC", gpu=1)
XID = Condition("gpu_xid", "critical", "h1", "XID 79", gpu=0, series="xid79")


@pytest.fixture
def manager(tmp_path: Path):
    sent: list[Alert] = []
    m = AlertManager(Store(tmp_path / "c.db"), [sent.extend])
    m.sent = sent  # type: ignore[attr-defined]
    return m


def test_fires_once_while_it_holds_and_resolves_when_it_leaves(manager) -> None:
    manager.sync("h1", "telemetry", [HOT], 1.0)
    manager.sync("h1", "telemetry", [HOT], 2.0)
    manager.sync("h1", "telemetry", [HOT, ECC], 3.0)
    manager.sync("h1", "telemetry", [ECC], 4.0)
    assert manager.sent == []  # nothing leaves before it is in SQLite
    assert manager.commit() == 3
    states = [(a.rule, a.state, a.ts) for a in manager.sent]
    assert states == [("gpu_temperature_high", "firing", 1.0),
                      ("gpu_ecc_uncorrected", "firing", 3.0),
                      ("gpu_temperature_high", "resolved", 4.0)]
    resolved = manager.sent[2]
    assert resolved.id == manager.sent[0].id and resolved.resolved_at == 4.0
    assert resolved.started_at == 1.0
    assert list(manager.firing) == [ECC.key]


def test_groups_and_hosts_do_not_resolve_each_other(manager) -> None:
    other = Condition("gpu_temperature_high", "warning", "h2", "hot", gpu=0)
    manager.sync("h1", "telemetry", [HOT], 1.0)
    manager.sync("h2", "telemetry", [other], 1.0)
    manager.sync("h1", "host", [], 2.0)
    manager.sync("h2", "telemetry", [], 2.0)
    manager.commit()
    assert list(manager.firing) == [HOT.key]


def test_a_held_alert_fires_once_is_extended_and_expires(manager) -> None:
    manager.hold(XID, until=10.0, ts=1.0)
    manager.hold(XID, until=15.0, ts=5.0)
    manager.expire(12.0)
    assert XID.key in manager.firing
    manager.expire(15.0)
    assert manager.commit() == 2  # the extension was saved, but it is not news
    assert manager.store.alerts(state="resolved")[0].rule == "gpu_xid"
    assert [(a.state, a.ts) for a in manager.sent] == [("firing", 1.0), ("resolved", 15.0)]


def test_a_re_fire_later_is_a_new_alert_with_a_new_id(manager) -> None:
    manager.sync("h1", "telemetry", [HOT], 1.0)
    manager.sync("h1", "telemetry", [], 2.0)
    manager.sync("h1", "telemetry", [HOT], 3.0)
    manager.commit()
    assert manager.sent[0].id != manager.sent[2].id
    assert manager.sent[0].key == manager.sent[2].key


def test_a_restarted_manager_resumes_firing_alerts_from_sqlite(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    first = AlertManager(store)
    first.sync("h1", "telemetry", [HOT], 1.0)
    first.hold(XID, until=100.0, ts=1.0)
    first.commit()
    store.close()
    sent: list[Alert] = []
    again = AlertManager(Store(tmp_path / "c.db"), [sent.extend])
    assert again.restore() == 2
    again.sync("h1", "telemetry", [HOT], 5.0)  # still hot: no second firing
    assert sent == []
    again.sync("h1", "telemetry", [], 6.0)  # it cooled: the restored alert resolves
    again.expire(100.0)  # the hold survived the restart
    again.commit()
    assert [(a.rule, a.state) for a in sent] == [("gpu_temperature_high", "resolved"),
                                                 ("gpu_xid", "resolved")]
    history = again.store.alerts(state="resolved")
    assert {a.rule for a in history} == {"gpu_temperature_high", "gpu_xid"}


def test_a_database_from_another_schema_is_refused_with_its_path(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "c.db")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match=r"c\.db: database schema v99; this build reads v1"):
        Store(tmp_path / "c.db")


def test_a_failed_commit_keeps_its_transitions_for_the_next(manager, monkeypatch) -> None:
    manager.sync("h1", "telemetry", [HOT], 1.0)
    real = manager.store.save_alerts

    def locked(items):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(manager.store, "save_alerts", locked)
    with pytest.raises(sqlite3.OperationalError):
        manager.commit()
    assert manager.sent == []
    monkeypatch.setattr(manager.store, "save_alerts", real)
    assert manager.commit() == 1 and manager.sent[0].rule == "gpu_temperature_high"
    assert manager.store.alert(manager.sent[0].id) == manager.sent[0]


def test_a_restored_level_alert_waits_for_its_rule_to_rebuild_its_history(tmp_path: Path) -> None:
    throttled = Condition("gpu_throttled", "warning", "h1", "GPU 0 throttled", gpu=0)
    store = Store(tmp_path / "c.db")
    first = AlertManager(store)
    first.sync("h1", "telemetry", [throttled], 100.0)
    first.commit()
    store.close()
    sent: list[Alert] = []
    again = AlertManager(Store(tmp_path / "c.db"), [sent.extend])
    again.restore(settle_until=230.0)
    # Right after the restart the rule has not seen 30 s of throttling yet: no condition.
    again.sync("h1", "telemetry", [], 200.0)
    again.commit()
    assert sent == [] and throttled.key in again.firing
    again.sync("h1", "telemetry", [throttled], 231.0)  # it holds again: still the same alert
    again.sync("h1", "telemetry", [], 240.0)  # and now it really stopped
    again.commit()
    assert [(a.rule, a.state, a.started_at) for a in sent] == [
        ("gpu_throttled", "resolved", 100.0)]


def test_prune_forgets_old_history_but_never_what_is_firing_or_pending(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    manager = AlertManager(store)
    manager.sync("h1", "telemetry", [HOT, ECC], 1.0)
    manager.sync("h1", "telemetry", [ECC], 2.0)  # HOT resolves at 2.0; ECC stays firing
    manager.commit()
    store.add_deliveries([manager.firing[ECC.key]], "webhook:x", 1.0)  # pending
    store.add_anomalies([(1.0, "h1", b"{}"), (500.0, "h1", b"{}")])
    assert store.prune(before=100.0) == 2  # the resolved alert and the old detection
    assert [a.rule for a in store.alerts()] == ["gpu_ecc_uncorrected"]
    assert store.delivery_counts() == {("webhook:x", "pending"): 1}
    assert len(store.anomalies()) == 1
