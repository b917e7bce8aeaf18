"""Everything the controller holds, built once from its config and passed to each part."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog

from llm_ops_helper.controller.alerts import AlertManager
from llm_ops_helper.controller.analytics.bank import BankFileError, DetectorBank
from llm_ops_helper.controller.anomalies import Analytics, Detection, SeriesInfo
from llm_ops_helper.controller.config import ConfigError, ControllerConfig
from llm_ops_helper.controller.fleet import Fleet
from llm_ops_helper.controller.ingest import Ingest
from llm_ops_helper.controller.sinks import MqttSink, WebhookSender, log_sink
from llm_ops_helper.controller.store import Store, StoreError

log = structlog.get_logger("llmops.controller")

DB_FILE = "controller.db"
DETECTORS_FILE = "detectors.npz"


@dataclass
class ControllerState:
    config: ControllerConfig
    store: Store
    fleet: Fleet
    alerts: AlertManager
    ingest: Ingest
    analytics: Analytics | None
    mqtt_alerts: MqttSink
    webhooks: list[WebhookSender] = field(default_factory=list)
    # Set by the daemon to its broker link's state; /healthz reports it.
    link_connected: Callable[[], bool] = field(default_factory=lambda: _never)
    # The broker link's counters: connects, internal_errors, alert_publish_failures.
    link_counters: Callable[[], dict[str, int]] = field(default_factory=lambda: dict)

    @property
    def detectors_path(self) -> Path:
        return self.config.state_dir / DETECTORS_FILE

    def record(self, detections: list[Detection]) -> None:
        self.store.add_anomalies([(d.ts, d.host, msgspec.json.encode(d)) for d in detections])
        for d in detections:
            log.warning("anomaly_detected", host=d.host, gpu=d.gpu, replica=d.replica,
                        series=d.series, feature=d.feature, score=round(d.score, 3),
                        value=d.value, expected=d.expected)

    def checkpoint(self) -> None:
        if self.analytics is not None:
            self.analytics.save(self.detectors_path)

    async def checkpoint_in_background(self) -> None:
        """Copy the detector state now; write it (an fsync'd file) in a worker thread."""
        if self.analytics is not None:
            write = self.analytics.bank.snapshot()
            await asyncio.to_thread(write, self.detectors_path)


def _never() -> bool:
    return False


def _load_bank(path: Path) -> DetectorBank:
    if not path.exists():
        return DetectorBank()
    try:
        bank = DetectorBank.load(path)
    except BankFileError as exc:
        raise ConfigError(f"{exc} (move it aside to start the detectors afresh)") from None
    log.info("detectors_restored", path=str(path), series=len(bank))
    return bank


def build_state(config: ControllerConfig) -> ControllerState:
    try:
        store = Store(config.state_dir / DB_FILE)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    fleet = Fleet(stale_after_intervals=config.fleet.stale_after_intervals)
    mqtt_alerts = MqttSink()
    webhooks = [WebhookSender(hook, store, config.alerts.external_url)
                for hook in config.alerts.webhooks]
    alerts = AlertManager(store, [log_sink, mqtt_alerts, *webhooks])
    rules = config.rules
    restored = alerts.restore(settle_until=time.time() + max(
        rules.throttle_sustained_s, rules.replica_startup_grace_s))
    if restored:
        log.info("alerts_restored", firing=restored)
    analytics = None
    if config.detection.enabled:
        grace = config.rules.replica_startup_grace_s

        def silenced(info: SeriesInfo, ts: float) -> bool:
            host = fleet.hosts.get(info.host)
            if info.replica is None or host is None:
                return False
            replica = host.replicas.get(info.replica)
            return replica is not None and ts - replica.started_at < grace

        analytics = Analytics(_load_bank(config.state_dir / DETECTORS_FILE),
                              config.detection.resolve_after_s,
                              silenced=silenced,
                              alert_after_samples=config.detection.alert_after_samples)
    ingest = Ingest(fleet, alerts, analytics, config.fleet, config.rules)
    return ControllerState(config, store, fleet, alerts, ingest, analytics, mqtt_alerts, webhooks)
