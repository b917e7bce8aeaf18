"""The controller's TOML configuration, read once into frozen typed objects.

Same contract as the agent's: any problem raises :class:`ConfigError` with one line naming the
file, the key and what was expected; ``__main__`` exits 78 (EX_CONFIG), which the unit file does
not restart. The broker password lives in its own file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from llm_ops_helper import tomlfile
from llm_ops_helper.brokertls import check_tls, with_tls_paths
from llm_ops_helper.keys import KeyStore, KeyStoreError
from llm_ops_helper.proto.messages import CRITICAL_XIDS
from llm_ops_helper.tomlfile import EX_CONFIG, ConfigError, NonNegative, Positive, Section

__all__ = ["EX_CONFIG", "ConfigError", "ControllerConfig", "load", "parse"]

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]  # 0: any free port (tests)


class BrokerConfig(Section, kw_only=True, frozen=True):
    # The MQTT broker's host name or address (required).
    host: str
    # The broker's port: 1883 plain, 8883 with systemd/mosquitto-tls.conf.
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1883
    # The controller's MQTT client id; its persistent session (subscriptions, queued telemetry) is
    # kept under it.
    client_id: str = "llmops-controller"
    # MQTT keep-alive; the broker declares the client gone (and publishes its Last Will) after 1.5
    # times this.
    keepalive_s: Annotated[int, msgspec.Meta(ge=2, le=3600)] = 30
    # systemd/mosquitto.acl grants the controller's rights to the user "llmops-controller".
    username: str = ""
    # A file holding the broker password (mode 600), not the password itself.
    password_file: str = ""
    # TLS to the broker: the same keys and meaning as the agent's [broker] section.
    tls: bool = False
    # The CA that signed the broker's certificate; empty: the system's CAs.
    ca_file: str = ""
    # Client certificate, for a broker with require_certificate true.
    cert_file: str = ""
    # The client certificate's private key.
    key_file: str = ""
    # Skip the host name check (the chain is still verified); never in production.
    tls_insecure: bool = False
    # How long the broker keeps the controller's subscriptions and queues its messages while it
    # is away: a restart loses nothing, a long outage does not come back to an unbounded replay.
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0)] = 300
    # First delay before reconnecting; doubles, with jitter, up to reconnect_max_s.
    reconnect_min_s: Positive = 0.5
    # Longest delay between reconnect attempts (at least reconnect_min_s).
    reconnect_max_s: Positive = 10.0


class HttpConfig(Section, kw_only=True, frozen=True):
    # Address the API, /metrics and /healthz listen on; put a TLS proxy in front.
    host: str = "127.0.0.1"
    # The API's port (0: any free port, for tests).
    port: Port = 8470
    # How agents reach this API (they download model artifacts from it), e.g.
    # "http://head-01.example:8470". Empty: http://{host}:{port} as bound, which only works when
    # host is an address the agents can reach (not 127.0.0.1 on a real fleet).
    advertise_url: str = ""


class ApiConfig(Section, kw_only=True, frozen=True):
    # Every route but /healthz needs a bearer token (`llmops tokens create`). True: /metrics is
    # served without one (else a Prometheus scrape config sends one: `authorization:
    # {credentials_file: ...}`, a viewer token).
    metrics_public: bool = False
    # True (only behind a proxy that sets it): the audit log records the first address of
    # X-Forwarded-For rather than the connection's peer.
    trust_forwarded: bool = False
    # A file holding a token registered at start-up as the admin "bootstrap" (a new token in
    # the file replaces the old one): how an install creates its first admin by script.
    bootstrap_token_file: str = ""


class RegistryConfig(Section, kw_only=True, frozen=True):
    # Artifacts (content-addressed by sha256) live under state.dir/blobs unless set here.
    blob_dir: str = ""
    # Largest upload accepted; 0: no limit but the disk.
    max_upload_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0


class CommandsConfig(Section, kw_only=True, frozen=True):
    # Commands to agents are signed with HMAC-SHA256, with a host's own key from keys_dir when
    # it has one, else with the fleet-wide key_file.

    # The id commands signed with key_file carry (the agents' [[commands.keys]] id).
    key_id: str = "fleet"
    # The fleet-wide signing secret's file (0600), shared with every agent.
    key_file: str = ""
    # Per-host keys (`llmops keys` writes them): {keys_dir}/{host}/{id}.key,
    # {keys_dir}/{host}/current naming the id signed with; else {keys_dir}/{host}.key under
    # key_id. They win over key_file and are read on every command: a rotation needs no restart.
    keys_dir: str = ""
    # A command not acted on within this long is refused as expired.
    ttl_s: Annotated[float, msgspec.Meta(ge=5, le=600)] = 120.0


class DeploymentsConfig(Section, kw_only=True, frozen=True):
    # A reconcile pass runs this often, and at once after any change or replica event.
    reconcile_interval_s: Positive = 1.0
    # A deploy command the agent has not acted on after this long is sent again.
    command_retry_s: Positive = 10.0
    # Replicas on a host offline this long are placed elsewhere.
    host_lost_grace_s: NonNegative = 60.0


class AutoscaleConfig(Section, kw_only=True, frozen=True):
    # Deployments with autoscale mode "on" or "advisory" are decided this often (a deployment's
    # own autoscale.interval_s, when longer, spaces its decisions further apart).
    interval_s: Positive = 5.0
    # The forecast horizon until a deployment's own replicas have shown how long they take
    # from placement to ready (then: the median of its recent ones).
    default_cold_start_s: Positive = 60.0
    # The most a window moves the learned capacity per replica (a fraction of it).
    capacity_step: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.25


class StateConfig(Section, kw_only=True, frozen=True):
    # SQLite database (alerts, anomalies, deliveries) and detector checkpoints live here.
    dir: str = "/var/lib/llmops-controller"
    # Detector and forecaster state is checkpointed this often (and at shutdown).
    checkpoint_interval_s: Positive = 60.0
    # Resolved alerts, finished webhook deliveries and anomaly detections older than this are
    # deleted (hourly); firing alerts and pending deliveries are kept whatever their age.
    retention_days: Positive = 30.0


class FleetConfig(Section, kw_only=True, frozen=True):
    # A host that sent nothing for this many of its own intervals is offline ("stale").
    stale_after_intervals: Annotated[float, msgspec.Meta(ge=1)] = 3.0
    # Telemetry accepted per host per second beyond its interval (a flood is dropped, counted).
    max_messages_per_s: Positive = 20.0
    # Messages a host may send at once above its rate (a reconnecting agent's buffered snapshots
    # must fit).
    burst: Annotated[int, msgspec.Meta(ge=1)] = 200
    # A host offline this long is forgotten: its state, its detectors (they would start afresh
    # if it came back) and its metrics series. Its alerts and their history stay in SQLite.
    forget_after_s: Positive = 7 * 86_400.0


class DetectionConfig(Section, kw_only=True, frozen=True):
    # Run the online anomaly detectors on every series.
    enabled: bool = True
    # Samples are scored in batches this often (vectorised across every series).
    batch_interval_s: Positive = 1.0
    # An anomaly alert resolves after this long without a new detection on its series.
    resolve_after_s: Positive = 300.0
    # A series raises anomaly alerts only once its model has learned this many samples: a new
    # host's first minutes are all news to its models (a controller meeting a fleet of 2,000
    # steady hosts flagged 1.5 per host in its first 30 s). Detections before that are counted.
    alert_after_samples: Annotated[int, msgspec.Meta(ge=0)] = 300


class RulesConfig(Section, kw_only=True, frozen=True):
    # A GPU hotter than this raises gpu_temperature_high.
    gpu_temperature_max_c: float = 85.0
    # Thermal or power throttling active this long (seconds of telemetry) raises an alert.
    throttle_sustained_s: NonNegative = 30.0
    # XID errors that raise gpu_xid (critical) and keep the GPU out of placement.
    critical_xids: frozenset[int] = CRITICAL_XIDS
    # An XID alert stays firing this long after the last XID of its kind on that GPU.
    xid_hold_s: Positive = 600.0
    # This many restarts within replica_restarts_window_s raise replica_restarting.
    replica_restarts_max: Annotated[int, msgspec.Meta(ge=1)] = 3
    # The window replica_restarts_max counts in.
    replica_restarts_window_s: Positive = 600.0
    # Replica alerts (rules and anomalies) are silenced this long after a replica (re)starts.
    replica_startup_grace_s: NonNegative = 120.0


class WebhookConfig(Section, kw_only=True, frozen=True):
    # The receiver's URL (http or https).
    url: str
    # "webhook": Alertmanager's webhook_config payload (version 4), what receivers built for
    # Alertmanager accept. "alertmanager": POST to an Alertmanager's /api/v2/alerts.
    format: Literal["webhook", "alertmanager"] = "webhook"
    # Per delivery attempt.
    timeout_s: Positive = 5.0
    # First retry delay of a failed delivery; doubles up to retry_max_s.
    retry_min_s: Positive = 1.0
    # Longest delay between retries (at least retry_min_s).
    retry_max_s: Positive = 300.0


class AlertsConfig(Section, kw_only=True, frozen=True):
    # Receivers of every alert firing and resolving.
    webhooks: list[WebhookConfig] = []
    # Where the alerts' generatorURL and the webhook's externalURL point (the dashboard).
    external_url: str = ""


class ControllerConfig(Section, kw_only=True, frozen=True):
    # Least level written to the JSON log on stdout (journald).
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    broker: BrokerConfig
    http: HttpConfig = HttpConfig()
    api: ApiConfig = ApiConfig()
    state: StateConfig = StateConfig()
    fleet: FleetConfig = FleetConfig()
    detection: DetectionConfig = DetectionConfig()
    rules: RulesConfig = RulesConfig()
    alerts: AlertsConfig = AlertsConfig()
    registry: RegistryConfig = RegistryConfig()
    commands: CommandsConfig = CommandsConfig()
    deployments: DeploymentsConfig = DeploymentsConfig()
    autoscale: AutoscaleConfig = AutoscaleConfig()
    source: str = ""

    def resolve(self, path: str) -> Path:
        return tomlfile.resolve(self.source, path)

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.state.dir)

    @property
    def blob_dir(self) -> Path:
        return self.resolve(self.registry.blob_dir) if self.registry.blob_dir \
            else self.state_dir / "blobs"

    def command_key(self, host: str) -> tuple[str, bytes] | None:
        """(key id, secret) that signs commands to ``host``: its own, else the fleet's."""
        if self.commands.keys_dir and host:
            store = KeyStore(self.resolve(self.commands.keys_dir))
            try:
                own = store.signing_key(host)
            except KeyStoreError as exc:
                raise ConfigError(f"{self.source}: key 'commands.keys_dir': {exc}") from None
            if own is not None:
                return own
            legacy = self.resolve(self.commands.keys_dir) / f"{host}.key"
            if legacy.is_file():
                return self.commands.key_id, tomlfile.read_secret(
                    self.source, str(legacy), "commands.keys_dir")
        if not self.commands.key_file:
            return None
        return self.commands.key_id, tomlfile.read_secret(self.source, self.commands.key_file,
                                                          "commands.key_file")

    def command_secret(self, host: str) -> bytes | None:
        """The secret of :meth:`command_key`."""
        key = self.command_key(host)
        return None if key is None else key[1]

    def bootstrap_token(self) -> str | None:
        """The token in api.bootstrap_token_file; None when unset or the file is absent."""
        if not self.api.bootstrap_token_file:
            return None
        if not self.resolve(self.api.bootstrap_token_file).exists():
            return None
        return tomlfile.read_secret(self.source, self.api.bootstrap_token_file,
                                    "api.bootstrap_token_file").decode().strip()

    def broker_password(self) -> str | None:
        if not self.broker.password_file:
            return None
        return tomlfile.read_secret(self.source, self.broker.password_file,
                                    "broker.password_file").decode()


def parse(text: str, source: str) -> ControllerConfig:
    config = msgspec.structs.replace(tomlfile.parse(text, source, ControllerConfig),
                                     source=source)
    _check(config)
    return msgspec.structs.replace(config, broker=with_tls_paths(config.broker, config.resolve))


def _check(config: ControllerConfig) -> None:
    src = config.source
    if config.broker.reconnect_max_s < config.broker.reconnect_min_s:
        raise ConfigError(f"{src}: key 'broker.reconnect_max_s': expected a value >= "
                          f"broker.reconnect_min_s ({config.broker.reconnect_min_s})")
    check_tls(config.broker, src, config.resolve)
    url = config.http.advertise_url
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{src}: key 'http.advertise_url': expected an http(s) URL, "
                          f"got {url!r}")
    if config.commands.key_file:
        config.command_secret("")  # unreadable or empty: fail at start-up, naming the key
    if config.commands.keys_dir and not config.resolve(config.commands.keys_dir).is_dir():
        raise ConfigError(f"{src}: key 'commands.keys_dir': no such directory "
                          f"{config.commands.keys_dir!r}")
    for i, hook in enumerate(config.alerts.webhooks):
        if not hook.url.startswith(("http://", "https://")):
            raise ConfigError(f"{src}: key 'alerts.webhooks[{i}].url': expected an http(s) URL, "
                              f"got {hook.url!r}")
        if hook.retry_max_s < hook.retry_min_s:
            raise ConfigError(f"{src}: key 'alerts.webhooks[{i}].retry_max_s': expected a value "
                              f">= retry_min_s ({hook.retry_min_s})")


def load(path: str | Path) -> ControllerConfig:
    return parse(tomlfile.read_text(path), str(path))
