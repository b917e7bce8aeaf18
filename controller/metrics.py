"""Prometheus exposition of the controller: fleet gauges, ingest counters, drop reasons.

Nothing is incremented per message through prometheus_client (its locks cost more than the
plain counters ingest keeps): a custom collector reads the controller's own state at scrape
time, so a Grafana scrape every 15 s costs one walk over the fleet and nothing in between.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llm_ops_helper.controller.ingest import KINDS

if TYPE_CHECKING:
    from llm_ops_helper.controller.state import ControllerState

# Every reason ingest can drop for, so a reason at zero is still a series (rate() needs it).
DROP_REASONS = ("bad_topic", "rate_limited", "too_large", "not_json", "schema",
                "unsupported_version", "host_mismatch", "duplicate")
_GPU_GAUGES = (
    ("llmops_gpu_temperature_celsius", "GPU temperature", "temperature_c"),
    ("llmops_gpu_power_watts", "GPU power draw", "power_w"),
    ("llmops_gpu_utilization_ratio", "GPU utilisation (0-1)", "utilization_gpu_pct"),
    ("llmops_gpu_memory_used_bytes", "GPU memory used", "memory_used_bytes"),
)


class ControllerCollector(Collector):
    def __init__(self, state: ControllerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        stats = s.ingest.stats
        messages = CounterMetricFamily("llmops_ingest_messages", "Messages accepted by kind",
                                       labels=["kind"])
        for kind in KINDS:
            messages.add_metric([kind], stats.messages[kind])
        yield messages
        dropped = CounterMetricFamily("llmops_ingest_dropped", "Messages dropped by reason",
                                      labels=["reason"])
        for reason in (*DROP_REASONS, *sorted(set(stats.dropped) - set(DROP_REASONS))):
            dropped.add_metric([reason], stats.dropped[reason])
        yield dropped
        yield GaugeMetricFamily("llmops_ingest_lag_seconds",
                                "Age of the newest telemetry snapshot handled", value=stats.lag_s)
        seq = s.fleet.seq
        yield GaugeMetricFamily("llmops_ingest_seq_missing",
                                "Telemetry seqs never received (current agent runs)",
                                value=sum(seq.missing(h) for h in s.fleet.hosts))
        yield CounterMetricFamily("llmops_ingest_seq_late", "Telemetry that arrived late",
                                  value=seq.late)
        yield CounterMetricFamily("llmops_ingest_agent_restarts",
                                  "Agent runs replaced by a new run_id", value=seq.restarts)
        hosts = GaugeMetricFamily("llmops_fleet_hosts", "Hosts by state", labels=["state"])
        for name, n in s.fleet.counts().items():
            hosts.add_metric([name], n)
        yield hosts
        yield from self._gpus()
        firing = GaugeMetricFamily("llmops_alerts_firing", "Alerts firing by severity",
                                   labels=["severity"])
        for severity, n in s.alerts.counts().items():
            firing.add_metric([severity], n)
        yield firing
        yield CounterMetricFamily("llmops_alerts_fired", "Alerts fired", value=s.alerts.fired_total)
        deliveries = GaugeMetricFamily("llmops_alert_deliveries", "Webhook deliveries by state",
                                       labels=["sink", "state"])
        for (sink, state), n in s.store.delivery_counts().items():
            deliveries.add_metric([sink, state], n)
        yield deliveries
        if s.analytics is not None:
            a = s.analytics
            yield CounterMetricFamily("llmops_analytics_samples", "Series samples scored",
                                      value=a.samples_total)
            yield CounterMetricFamily("llmops_anomalies_detected", "Anomaly detections",
                                      value=a.detections_total)
            yield GaugeMetricFamily("llmops_analytics_series", "Series with a detector",
                                    value=len(a.bank.keys()))
            yield CounterMetricFamily("llmops_analytics_skipped_snapshots",
                                      "Snapshots not modelled: more series than a host can have",
                                      value=a.skipped_too_many_series)
            yield GaugeMetricFamily("llmops_analytics_batch_seconds",
                                    "Duration of the last scoring batch", value=a.batch_seconds)

    def _gpus(self) -> Iterator[Metric]:
        families = [GaugeMetricFamily(name, help_, labels=["host", "gpu", "uuid"])
                    for name, help_, _ in _GPU_GAUGES]
        healthy = GaugeMetricFamily("llmops_gpu_healthy", "1 if the GPU answers",
                                    labels=["host", "gpu", "uuid"])
        for host in self.state.fleet.hosts.values():
            if not host.online or host.telemetry is None:
                continue
            for gpu in host.telemetry.gpus:
                labels = [host.host, str(gpu.index), gpu.uuid]
                healthy.add_metric(labels, 1.0 if gpu.healthy else 0.0)
                for family, (_, _, field) in zip(families, _GPU_GAUGES, strict=True):
                    value = getattr(gpu, field)
                    if value is not None:
                        family.add_metric(labels, value / 100 if field.endswith("_pct")
                                          else value)
        yield healthy
        yield from families


def registry_for(state: ControllerState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(state))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
