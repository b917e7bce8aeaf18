"""Everything the controller holds, built once from its config and passed to each part."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog

from llm_ops_helper.controller.alerts import AlertManager
from llm_ops_helper.controller.analytics.bank import BankFileError, DetectorBank
from llm_ops_helper.controller.anomalies import Analytics, Detection, SeriesInfo
from llm_ops_helper.controller.auth import TokenError, TokenStore, UrlSigner
from llm_ops_helper.controller.autoscale.autoscaler import Autoscaler, AutoscalerConfig
from llm_ops_helper.controller.autoscale.store import DecisionStore, DecisionStoreError
from llm_ops_helper.controller.config import ConfigError, ControllerConfig
from llm_ops_helper.controller.deployments.commands import CommandError, CommandSender
from llm_ops_helper.controller.deployments.reconciler import Deployments, EngineConfig
from llm_ops_helper.controller.deployments.store import DeploymentStore
from llm_ops_helper.controller.fleet import Fleet
from llm_ops_helper.controller.ingest import Ingest
from llm_ops_helper.controller.registry import Registry
from llm_ops_helper.controller.sinks import MqttSink, WebhookSender, log_sink
from llm_ops_helper.controller.store import Store, StoreError

log = structlog.get_logger("llmops.controller")

DB_FILE = "controller.db"
DETECTORS_FILE = "detectors.npz"
URL_KEY_FILE = "artifact-url.key"
AUTOSCALE_FILE = "autoscale.pickle"
# Signed commands waiting for the broker link at most; beyond, a send fails (and is retried).
COMMAND_QUEUE_MAX = 10_000


@dataclass
class ControllerState:
    config: ControllerConfig
    store: Store
    fleet: Fleet
    alerts: AlertManager
    ingest: Ingest
    analytics: Analytics | None
    mqtt_alerts: MqttSink
    registry: Registry
    deployments: Deployments
    # Signed commands waiting for the broker link, (topic, payload, expires_at).
    commands_out: asyncio.Queue[tuple[str, bytes, float]]
    autoscaler: Autoscaler
    # API tokens and the audit log (controller/auth.py).
    tokens: TokenStore
    webhooks: list[WebhookSender] = field(default_factory=list)
    # Where agents reach the API (artifact downloads): the configured advertise_url, else the
    # address the HTTP server bound (the daemon sets it once bound).
    public_url: str = ""
    # Signs the artifact URLs in deploy commands (agents download without an API token).
    url_signer: UrlSigner | None = None
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

    @property
    def autoscale_path(self) -> Path:
        return self.config.state_dir / AUTOSCALE_FILE

    def checkpoint(self) -> None:
        if self.analytics is not None:
            self.analytics.save(self.detectors_path)
        self.autoscaler.save(self.autoscale_path)

    async def checkpoint_in_background(self) -> None:
        """Copy the detector and forecaster state now; write each (an fsync'd file) in a
        worker thread."""
        if self.analytics is not None:
            write = self.analytics.bank.snapshot()
            await asyncio.to_thread(write, self.detectors_path)
        await asyncio.to_thread(self.autoscaler.snapshot(), self.autoscale_path)


def _url_secret(path: Path) -> bytes:
    """The controller's own secret for artifact URLs, made on first start (0600)."""
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read or create the artifact URL key: "
                          f"{exc.strerror}") from None
    if not secret:
        raise ConfigError(f"{path}: the artifact URL key is empty (delete it to make a new one)")
    return secret


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
    registry = Registry(config.state_dir / DB_FILE, config.blob_dir,
                        max_artifact_bytes=config.registry.max_upload_bytes or None)
    commands_out: asyncio.Queue[tuple[str, bytes, float]] = asyncio.Queue(
        maxsize=COMMAND_QUEUE_MAX)

    def secret_for(host: str) -> tuple[str, bytes]:
        # Read on every command: a rotation in commands.keys_dir counts from the next one.
        try:
            key = config.command_key(host)
        except ConfigError as exc:  # a key file removed or emptied since start-up
            raise LookupError(str(exc)) from None
        if key is None:
            raise LookupError("no key in commands.keys_dir and no commands.key_file "
                              "configured: agents refuse unsigned commands")
        return key

    ttl_s = config.commands.ttl_s

    def publish(topic: str, payload: bytes) -> None:
        # Nothing is queued for a link that is down: the reconciler sends again what an agent
        # has not acted on, once the link is back and the agent reports.
        if not state.link_connected():
            raise CommandError("the broker link is down")
        try:
            commands_out.put_nowait((topic, payload, time.time() + ttl_s))
        except asyncio.QueueFull:
            raise CommandError(f"{COMMAND_QUEUE_MAX} commands already wait for the broker "
                               "link") from None

    sender = CommandSender(config.commands.key_id, secret_for, publish, ttl_s=ttl_s)
    signer = UrlSigner(_url_secret(config.state_dir / URL_KEY_FILE))
    d = config.deployments
    deployments = Deployments(
        DeploymentStore(config.state_dir / DB_FILE), fleet,
        lambda: alerts.firing.values(), registry, sender,
        lambda sha, host: (f"{state.public_url.rstrip('/')}/api/v1/artifacts/{sha}?"
                           + signer.query(sha, host)),
        EngineConfig(reconcile_interval_s=d.reconcile_interval_s,
                     command_retry_s=d.command_retry_s, host_lost_grace_s=d.host_lost_grace_s))
    registry.in_use = deployments.refs_in_use
    deployments.link_up = lambda: state.link_connected()
    ingest.on_event = deployments.on_event
    ingest.on_result = deployments.on_result
    try:
        decisions = DecisionStore(config.state_dir / DB_FILE)
    except DecisionStoreError as exc:
        raise ConfigError(str(exc)) from None
    a = config.autoscale
    autoscaler = Autoscaler(deployments, decisions, config=AutoscalerConfig(
        interval_s=a.interval_s, default_cold_start_s=a.default_cold_start_s,
        capacity_step=a.capacity_step))
    if restored := autoscaler.restore(config.state_dir / AUTOSCALE_FILE):
        log.info("autoscale_restored", path=str(config.state_dir / AUTOSCALE_FILE),
                 deployments=restored)
    try:
        tokens = TokenStore(config.state_dir / DB_FILE)
        bootstrap = config.bootstrap_token()
        if bootstrap and tokens.bootstrap(bootstrap):
            log.info("bootstrap_token_registered", file=config.api.bootstrap_token_file)
    except TokenError as exc:
        raise ConfigError(f"{config.source}: key 'api.bootstrap_token_file': {exc}") from None
    state = ControllerState(config, store, fleet, alerts, ingest, analytics, mqtt_alerts,
                            registry, deployments, commands_out, autoscaler, tokens, webhooks,
                            public_url=config.http.advertise_url, url_signer=signer)
    registry.gc()
    return state
