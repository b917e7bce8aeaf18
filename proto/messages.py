"""Typed message structs for every payload on the wire.

Rules (DESIGN.md): every message carries ``v``; new fields get defaults; unknown fields are
ignored on decode; ``None`` means "not reported by this device" (nvidia-smi's ``N/A``), never 0.
Units are in the field name (``_bytes``, ``_w``, ``_c``, ``_mhz``, ``_pct``, ``_s``).
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec

SCHEMA_VERSION = 1


class _Msg(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    pass


class GpuInfo(_Msg, kw_only=True, frozen=True):
    """One GPU in an agent's inventory (the retained status)."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int | None = None


class GpuSample(_Msg, kw_only=True, frozen=True):
    """One GPU at one instant. Counters (``*_total``, ``pcie_replay_count``) rise monotonically."""

    index: int
    uuid: str
    name: str = ""
    healthy: bool = True
    error: str | None = None
    utilization_gpu_pct: float | None = None
    utilization_memory_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: int | None = None
    sm_clock_max_mhz: int | None = None
    # Active clock-event ("throttle") reasons, by NVML's names without prefix, e.g.
    # "sw_power_cap", "hw_thermal_slowdown". An idle GPU reports "gpu_idle".
    throttle_reasons: list[str] = []
    # Volatile ECC counts (since the driver loaded); None where ECC is off or unsupported.
    ecc_corrected_total: int | None = None
    ecc_uncorrected_total: int | None = None
    # Pre-Ampere page retirement.
    retired_pages: int | None = None
    retired_pages_pending: bool | None = None
    # Ampere and newer row remapping.
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None
    pcie_replay_count: int | None = None


class HostSample(_Msg, kw_only=True, frozen=True):
    cpu_pct: float
    cpu_count: int
    load_1m: float
    load_5m: float
    load_15m: float
    memory_total_bytes: int
    memory_available_bytes: int
    memory_used_bytes: int
    swap_used_bytes: int = 0
    disk_path: str = "/"
    disk_total_bytes: int = 0
    disk_used_bytes: int = 0
    disk_read_bytes_total: int | None = None
    disk_write_bytes_total: int | None = None
    net_recv_bytes_total: int = 0
    net_sent_bytes_total: int = 0
    net_errors_total: int = 0
    net_drops_total: int = 0
    boot_time: float = 0.0


class Histogram(_Msg, kw_only=True, frozen=True):
    """A Prometheus histogram: cumulative bucket counts by upper bound, ascending.

    On the wire the ``+Inf`` bucket is implicit (its count is ``count``): JSON has no infinity, so
    :func:`~llm_ops_helper.proto.codec.encode` leaves out buckets that are not finite, and a
    decoded histogram has finite upper bounds only.
    """

    sum: float
    count: float
    buckets: list[tuple[float, float]] = []


# A supervised replica's life: pending (accepted) -> fetching (artifact) -> starting (process up,
# not answering yet) -> ready -> draining (no new requests, in-flight ones finish) -> stopped;
# failed (with a reason) from any of them: crash loop, ready timeout, fetch error, exits at once.
ReplicaState = Literal["pending", "fetching", "starting", "ready", "draining", "stopped",
                       "failed"]
REPLICA_STATES: tuple[ReplicaState, ...] = ("pending", "fetching", "starting", "ready",
                                            "draining", "stopped", "failed")


class ReplicaSample(_Msg, kw_only=True, frozen=True):
    """One inference-server replica's scraped metrics, under canonical names."""

    name: str
    runtime: str
    up: bool
    error: str | None = None
    scrape_ms: float | None = None
    # Canonical gauges and counters, e.g. requests_running, kv_cache_usage, prompt_tokens_total.
    # A NaN or infinite value (legal in Prometheus text) is not sent: absent means not reported.
    metrics: dict[str, float] = {}
    # Canonical histograms, e.g. ttft_seconds, itl_seconds, e2e_seconds.
    histograms: dict[str, Histogram] = {}
    # Set for replicas the agent supervises (started by a deploy_replica command); None for
    # replicas it only scrapes (configured by hand).
    state: ReplicaState | None = None
    # Why it is in that state: "exited with code 1: <last log line>", "ready timeout 300 s".
    reason: str | None = None
    deployment: str | None = None
    # The model version it serves, "name@N".
    version: str | None = None
    # Base URL of its OpenAI-compatible API (what the gateway and clients call).
    url: str | None = None
    gpus: list[int] = []
    restarts: int = 0
    # Hash of the deploy_replica body it runs: the controller's check that it runs what was sent.
    spec_hash: str | None = None
    pid: int | None = None
    started_at: float | None = None


class CollectorStat(_Msg, kw_only=True, frozen=True):
    """How one collector fared on one tick (Telegraf's per-input gather metrics)."""

    name: str
    ok: bool
    duration_ms: float
    error: str | None = None


class AgentCounters(_Msg, kw_only=True, frozen=True):
    """The agent's own counters since it started, for the controller and dashboards."""

    buffered: int = 0
    dropped_buffer_full: int = 0
    reconnects: int = 0
    # Ticks whose collection outlasted the interval (the missed ticks were skipped, not burst).
    ticks_overrun: int = 0
    commands_rejected: dict[str, int] = {}


class Telemetry(_Msg, kw_only=True, frozen=True):
    v: int = SCHEMA_VERSION
    host: str
    run_id: str
    seq: int
    ts: float
    interval_s: float
    host_metrics: HostSample | None = None
    gpus: list[GpuSample] = []
    replicas: list[ReplicaSample] = []
    collectors: list[CollectorStat] = []
    agent: AgentCounters = AgentCounters()


class Status(_Msg, kw_only=True, frozen=True):
    """Retained per agent; the Last Will is the same struct with ``state="offline"``."""

    v: int = SCHEMA_VERSION
    host: str
    state: Literal["online", "offline"]
    ts: float
    run_id: str = ""
    agent_version: str = ""
    interval_s: float | None = None
    capabilities: list[str] = []
    gpus: list[GpuInfo] = []
    runtimes: list[str] = []
    # Why the agent went offline: "shutdown" (clean stop) or "lost" (Last Will).
    reason: str | None = None


Severity = Literal["info", "warning", "critical"]

# XIDs that mean the GPU or its memory can no longer be trusted: drain and reset, or replace.
# The agent marks their events critical; the controller alerts on them by this same list.
CRITICAL_XIDS = frozenset({48, 63, 64, 74, 79, 94, 95, 119, 120})


class Event(_Msg, kw_only=True, frozen=True):
    """Something discrete that happened on a host: an XID, an ECC error, a replica exiting."""

    v: int = SCHEMA_VERSION
    host: str
    ts: float
    kind: str
    severity: Severity = "info"
    message: str = ""
    gpu: int | None = None
    replica: str | None = None
    data: dict[str, str | int | float | bool | None] = {}


class CommandKind(enum.StrEnum):
    DEPLOY_REPLICA = "deploy_replica"
    STOP_REPLICA = "stop_replica"
    DRAIN_REPLICA = "drain_replica"
    FETCH_ARTIFACT = "fetch_artifact"
    EVICT_ARTIFACT = "evict_artifact"
    SYNC = "sync"


# Bounds checked when a command body is decoded: a value outside them is refused with the
# field's name instead of reaching a path, a timer or a crash-loop window.
Sha256 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
_Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400 * 7)]
_Timeout = Annotated[float, msgspec.Meta(ge=0, le=86400)]


class ArtifactRef(_Msg, kw_only=True, frozen=True):
    """A model artifact in the controller's repository, as an agent fetches it."""

    sha256: Sha256
    size_bytes: Annotated[int, msgspec.Meta(ge=0)]
    # Absolute URL of the download (Range requests supported), e.g.
    # http://head:8470/api/v1/artifacts/<sha256>.
    url: str
    # The file name the runtime sees (some runtimes look at the extension).
    filename: str = "model.bin"


class ReplicaSpec(_Msg, kw_only=True, frozen=True):
    """Body of ``deploy_replica``: everything an agent needs to run one replica.

    Idempotent by ``name``: the same name with the same spec again is a no-op; a replica for a
    new version or new arguments gets a new name from the controller.
    """

    name: str
    deployment: str
    version: str
    runtime: str
    artifact: ArtifactRef | None = None
    # For runtimes that fetch their model themselves (``vllm serve org/model``).
    source_uri: str | None = None
    # The model name clients put in requests; the deployment's name when empty.
    served_model_name: str = ""
    args: list[str] = []
    env: dict[str, str] = {}
    # GPU indices (NVML order) given to the replica through CUDA_VISIBLE_DEVICES.
    gpus: list[int] = []
    gpu_memory_bytes: int | None = None
    # The "command" runtime: argv with {host}, {port}, {model} and {name} placeholders.
    command: list[str] = []
    health_path: str = "/health"
    metrics_path: str | None = "/metrics"
    # Which metric_names.toml table reads its /metrics (the "command" runtime; others: own).
    metrics_format: str | None = None
    ready_timeout_s: _Seconds = 300.0
    # Restarts within the window beyond which the replica is failed ("crash loop").
    crash_loop_restarts: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 3
    crash_loop_window_s: _Seconds = 300.0
    # The drain timeout of a ``drain_replica`` / ``stop_replica`` whose body omits
    # ``timeout_s``; a ``timeout_s`` in the body always wins.
    drain_timeout_s: _Timeout = 30.0


class StopReplica(_Msg, kw_only=True, frozen=True):
    """Body of ``stop_replica`` and ``drain_replica`` (which always drains)."""

    name: str
    # Drain first: report "draining" (routing stops), wait until nothing is in flight or the
    # timeout passes, then SIGTERM and, after the grace period, SIGKILL.
    drain: bool = True
    # None: the replica spec's ``drain_timeout_s``.
    timeout_s: _Timeout | None = None


class EvictArtifact(_Msg, kw_only=True, frozen=True):
    sha256: Sha256


class Command(_Msg, kw_only=True, frozen=True):
    """A signed envelope. ``sig`` is HMAC-SHA256 over the canonical bytes of the rest."""

    v: int = SCHEMA_VERSION
    id: str
    kind: str
    issued_at: float
    expires_at: float
    key_id: str
    body: dict[str, Any] = {}
    sig: str = ""


class CommandResult(_Msg, kw_only=True, frozen=True):
    v: int = SCHEMA_VERSION
    command_id: str
    host: str
    status: Literal["ok", "error"]
    ts: float
    error: str | None = None
    detail: dict[str, Any] = {}


class Alert(_Msg, kw_only=True, frozen=True):
    """One alert at one transition. ``id`` names one firing (a later re-fire gets a new id);
    ``key`` is what de-duplicates: rule, host, GPU, replica and series."""

    v: int = SCHEMA_VERSION
    id: str
    key: str = ""
    state: Literal["firing", "resolved"]
    severity: Severity
    rule: str
    host: str | None = None
    gpu: int | None = None
    replica: str | None = None
    series: str | None = None
    summary: str = ""
    value: float | None = None
    ts: float
    started_at: float | None = None
    resolved_at: float | None = None
    labels: dict[str, str] = {}
