"""Typed message structs for every payload on the wire.

Rules (DESIGN.md): every message carries ``v``; new fields get defaults; unknown fields are
ignored on decode; ``None`` means "not reported by this device" (nvidia-smi's ``N/A``), never 0.
Units are in the field name (``_bytes``, ``_w``, ``_c``, ``_mhz``, ``_pct``, ``_s``).
"""

from __future__ import annotations

import enum
from typing import Any, Literal

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
