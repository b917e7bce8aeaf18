"""The agent's TOML configuration, read once into frozen typed objects.

Any problem raises :class:`ConfigError` with one line naming the file, the key and what was
expected; ``__main__`` prints it and exits 78 (EX_CONFIG), which the unit file does not restart.
Secrets (command keys, broker password) live in their own files, named here by path.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from llm_ops_helper import tomlfile
from llm_ops_helper.brokertls import check_tls, with_tls_paths
from llm_ops_helper.proto.topics import TopicError, validate_host
from llm_ops_helper.tomlfile import EX_CONFIG, ConfigError, NonNegative, Positive, Section

__all__ = ["EX_CONFIG", "AgentConfig", "ConfigError", "load", "parse"]

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class BrokerConfig(Section, kw_only=True, frozen=True):
    # The MQTT broker's host name or address (required).
    host: str
    # The broker's port: 1883 plain, 8883 with systemd/mosquitto-tls.conf.
    port: Port = 1883
    # MQTT keep-alive; the broker declares the client gone (and publishes its Last Will) after 1.5
    # times this.
    keepalive_s: Annotated[int, msgspec.Meta(ge=2, le=3600)] = 30
    # With systemd/mosquitto.acl the username must be this agent's host name: the ACL lets
    # user %u publish only under llmops/v1/agents/%u/ and read only its own commands.
    username: str = ""
    # A file holding the broker password (mode 600), not the password itself.
    password_file: str = ""
    # How long the broker keeps this agent's session (and queued commands) while it is away.
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0)] = 3600
    # First delay before reconnecting; doubles, with jitter, up to reconnect_max_s.
    reconnect_min_s: Positive = 0.5
    # Longest delay between reconnect attempts (at least reconnect_min_s).
    reconnect_max_s: Positive = 10.0
    # TLS to the broker (port 8883 in systemd/mosquitto-tls.conf), checked with the keys below.
    tls: bool = False
    # The CA that signed the broker's certificate; empty: the system's CAs.
    ca_file: str = ""
    # Client certificate, for a broker with require_certificate true.
    cert_file: str = ""
    # The client certificate's private key.
    key_file: str = ""
    # Skip the host name check (the chain is still verified); never in production.
    tls_insecure: bool = False


class TelemetryConfig(Section, kw_only=True, frozen=True):
    # One telemetry snapshot is published this often.
    interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=3600)] = 1.0
    # Snapshots kept while the broker is unreachable, sent oldest first when it returns.
    buffer_s: Annotated[float, msgspec.Meta(ge=0)] = 900.0
    # MQTT QoS of telemetry: 1 survives a broker hiccup, 0 is cheaper.
    qos: Literal[0, 1] = 1
    # Per-collector time limit; defaults to 80 % of the interval.
    collector_timeout_s: Positive | None = None


class GpusConfig(Section, kw_only=True, frozen=True):
    # Where GPU data comes from. auto: NVML when an NVIDIA driver is present, simulated GPUs
    # otherwise; none: no GPU collector.
    backend: Literal["auto", "nvml", "simulated", "none"] = "auto"
    # How many GPUs the simulated backend reports.
    simulated_count: Annotated[int, msgspec.Meta(ge=0, le=64)] = 8
    # Board the simulated GPUs imitate: a100-sxm4-80gb, a10g, t4, rtx-4000-sff-ada, h100-sxm5-80gb,
    # h200-sxm-141gb.
    simulated_profile: str = "a100-sxm4-80gb"
    # A fault scenario for simulated GPUs (systemd/scenario.example.toml), relative to this file.
    scenario: str = ""


class HostMetricsConfig(Section, kw_only=True, frozen=True):
    # Sample host CPU, memory, load, disk and network.
    enabled: bool = True
    # The filesystem whose usage is reported.
    disk_path: str = "/"


class ReplicaTarget(Section, kw_only=True, frozen=True):
    """A replica to scrape that this agent does not (yet) supervise itself."""

    # The replica's name in telemetry (unique on this host).
    name: str
    # How to read its metrics: vllm, sglang, llamacpp or sim.
    runtime: str
    # Its Prometheus /metrics URL (http or https).
    metrics_url: str


class CommandKey(Section, kw_only=True, frozen=True):
    # The key id commands name in key_id.
    id: str
    # The file holding the secret (0600, owned by the agent's user).
    file: str


class CommandsConfig(Section, kw_only=True, frozen=True):
    # Keys that may sign commands: each [[commands.keys]] entry, and every {id}.key file in
    # keys_dir (what `llmops keys` writes for this host). Files are read again when they change,
    # so a key added or removed during a rotation needs no restart; an entry's id stays fixed.
    keys: list[CommandKey] = []
    # A directory of {id}.key files, each a key that may sign commands (`llmops keys` on the head
    # node writes them).
    keys_dir: str = ""
    # A command whose expires_at is further ahead than this is refused.
    max_lifetime_s: Positive = 600.0
    # Clock difference tolerated between controller and agent when checking issued_at / expires_at.
    clock_skew_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0


class SupervisorConfig(Section, kw_only=True, frozen=True):
    """The replicas this agent starts itself (deploy_replica) and their artifact cache."""

    # replicas.json (what runs, so a restarted agent adopts it) and logs/{replica}.log.
    state_dir: str = "/var/lib/llmops-agent"
    # Model artifacts by sha256; default {state_dir}/artifacts.
    cache_dir: str = ""
    # Least recently used artifacts no replica uses are evicted to stay under this.
    cache_max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 100 << 30
    # Where replicas listen; 0.0.0.0 serves the fleet (the gateway calls them).
    bind_host: str = "0.0.0.0"
    # The host name in the URLs the controller and the gateway call; default: this host's FQDN.
    advertise_host: str = ""
    # Replicas get a free port from this range [low, high].
    port_range: tuple[Port, Port] = (20000, 29999)
    # SIGTERM to the replica's process group, then SIGKILL after this long.
    stop_grace_s: NonNegative = 30.0
    # First delay before restarting an exited replica; doubles up to restart_backoff_max_s.
    restart_backoff_min_s: Positive = 1.0
    # Longest delay between restarts.
    restart_backoff_max_s: Positive = 60.0
    # A ready replica's health endpoint is probed this often.
    liveness_interval_s: Positive = 5.0
    # Consecutive failed health probes of a ready replica before it is killed and restarted.
    liveness_failures: Annotated[int, msgspec.Meta(ge=1)] = 3
    # A draining replica is stopped no sooner than this, even when idle at once.
    drain_delay_s: NonNegative = 2.0
    # false: an agent restart or upgrade never stops inference; the state file lets the next
    # agent adopt the replicas.
    stop_replicas_on_exit: bool = False
    # Per artifact download (a 100 GB model on 1 GbE takes ~15 min).
    download_timeout_s: Positive = 3600.0
    # A running replica's log is cut back to its last part once it grows past this.
    log_max_bytes: Annotated[int, msgspec.Meta(ge=1 << 16)] = 64 << 20

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.state_dir) / "artifacts"

    @property
    def advertised_host(self) -> str:
        return self.advertise_host or socket.getfqdn()


class AgentConfig(Section, kw_only=True, frozen=True):
    # This host's name on the wire (topics llmops/v1/agents/{host}/...). Default: the short host
    # name.
    host: str = ""
    # Least level written to the JSON log on stdout (journald).
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    broker: BrokerConfig
    telemetry: TelemetryConfig = TelemetryConfig()
    gpus: GpusConfig = GpusConfig()
    host_metrics: HostMetricsConfig = HostMetricsConfig()
    # Inference servers to scrape that this agent does not start itself.
    replicas: list[ReplicaTarget] = []
    commands: CommandsConfig = CommandsConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    # Filled in by load(): the file this came from, for messages and relative paths.
    source: str = ""

    @property
    def hostname(self) -> str:
        return self.host or socket.gethostname().split(".")[0]

    @property
    def collector_timeout_s(self) -> float:
        return self.telemetry.collector_timeout_s or 0.8 * self.telemetry.interval_s

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's directory."""
        return tomlfile.resolve(self.source, path)

    def read_secret(self, path: str, key: str) -> bytes:
        return tomlfile.read_secret(self.source, path, key)


def parse(text: str, source: str) -> AgentConfig:
    config = msgspec.structs.replace(tomlfile.parse(text, source, AgentConfig), source=source)
    _check(config)
    return msgspec.structs.replace(config, broker=with_tls_paths(config.broker, config.resolve))


def _check(config: AgentConfig) -> None:
    src = config.source
    try:
        validate_host(config.hostname)
    except TopicError as exc:
        raise ConfigError(f"{src}: key 'host': {exc}") from None
    if config.broker.reconnect_max_s < config.broker.reconnect_min_s:
        raise ConfigError(f"{src}: key 'broker.reconnect_max_s': expected a value >= "
                          f"broker.reconnect_min_s ({config.broker.reconnect_min_s})")
    if config.broker.username and config.broker.username != config.hostname:
        raise ConfigError(f"{src}: key 'broker.username': expected the agent's host name "
                          f"{config.hostname!r} (the broker ACL allows user %u to publish only "
                          f"under llmops/v1/agents/%u/), got {config.broker.username!r}")
    check_tls(config.broker, src, config.resolve)
    if config.telemetry.buffer_s < config.telemetry.interval_s:
        raise ConfigError(f"{src}: key 'telemetry.buffer_s': expected at least one interval "
                          f"({config.telemetry.interval_s} s)")
    names = [r.name for r in config.replicas]
    for i, replica in enumerate(config.replicas):
        if names.count(replica.name) > 1:
            raise ConfigError(f"{src}: key 'replicas[{i}].name': {replica.name!r} is used twice")
        if not replica.metrics_url.startswith(("http://", "https://")):
            raise ConfigError(f"{src}: key 'replicas[{i}].metrics_url': expected an http(s) URL, "
                              f"got {replica.metrics_url!r}")
    sup = config.supervisor
    if sup.port_range[1] < sup.port_range[0]:
        raise ConfigError(f"{src}: key 'supervisor.port_range': expected [low, high] with low <= "
                          f"high, got {list(sup.port_range)}")
    if sup.restart_backoff_max_s < sup.restart_backoff_min_s:
        raise ConfigError(f"{src}: key 'supervisor.restart_backoff_max_s': expected a value >= "
                          f"supervisor.restart_backoff_min_s ({sup.restart_backoff_min_s})")
    for key in ("state_dir", "cache_dir"):
        value = getattr(sup, key)
        if value and not Path(value).is_absolute():
            raise ConfigError(f"{src}: key 'supervisor.{key}': expected an absolute path, "
                              f"got {value!r}")
    if config.gpus.scenario and not config.resolve(config.gpus.scenario).is_file():
        raise ConfigError(f"{src}: key 'gpus.scenario': no such file {config.gpus.scenario!r}")


def load(path: str | Path) -> AgentConfig:
    return parse(tomlfile.read_text(path), str(path))
