"""Prometheus exposition of the controller: fleet gauges, ingest counters, drop reasons.

Nothing is incremented per message through prometheus_client (its locks cost more than the
plain counters ingest keeps): a custom collector reads the controller's own state at scrape
time, so a Grafana scrape every 15 s costs one walk over the fleet and nothing in between.
GPUs are exported as fleet aggregates plus one ``up`` series per host: a series per GPU and
field (80,000 at 2,000 hosts) took half a second of the event loop per scrape. Per-GPU history
belongs to a TSDB fed by the agents' own exporters, not to the controller.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llm_ops_helper.controller.ingest import DROP_REASONS, KINDS

if TYPE_CHECKING:
    from llm_ops_helper.controller.state import ControllerState



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
        # Every reason, at 0 too, so rate() has a series from the start.
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
        link = s.link_counters()
        for name, help_ in (("connects", "Broker sessions opened"),
                            ("internal_errors", "Messages whose handling hit a bug (logged)"),
                            ("alert_publish_failures", "Alerts not acknowledged on MQTT"),
                            ("command_publish_failures", "Commands not acknowledged on MQTT"),
                            ("commands_expired", "Commands dropped unsent past their expiry"),
                            ("task_errors", "Periodic ticks that failed (logged)")):
            yield CounterMetricFamily(f"llmops_broker_{name}", help_, value=link.get(name, 0))
        yield from self._deployments()
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
            yield CounterMetricFamily("llmops_anomalies_while_learning",
                                      "Detections on series younger than alert_after_samples",
                                      value=a.learning_detections)
            yield GaugeMetricFamily("llmops_analytics_series", "Series with a detector",
                                    value=len(a.bank))
            yield CounterMetricFamily("llmops_analytics_skipped_snapshots",
                                      "Snapshots not modelled: more series than a host can have",
                                      value=a.skipped_too_many_series)
            yield GaugeMetricFamily("llmops_analytics_batch_seconds",
                                    "Duration of the last scoring batch", value=a.batch_seconds)

    def _deployments(self) -> Iterator[Metric]:
        engine = self.state.deployments
        phase = GaugeMetricFamily("llmops_deployment_phase", "1 for the phase each deployment "
                                  "is in", labels=["deployment", "phase"])
        desired = GaugeMetricFamily("llmops_deployment_replicas_desired", "Replicas asked for",
                                    labels=["deployment"])
        ready = GaugeMetricFamily("llmops_deployment_replicas_ready", "Replicas ready",
                                  labels=["deployment"])
        for view in engine.list_views():
            phase.add_metric([view["name"], view["phase"]], 1)
            desired.add_metric([view["name"]], view["desired"])
            ready.add_metric([view["name"]], view["ready"])
        yield from (phase, desired, ready)
        yield CounterMetricFamily("llmops_reconcile_errors", "Reconcile passes of a deployment "
                                  "that failed (logged)", value=engine.tick_errors)

    def _gpus(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("llmops_host_up", "1 if the host is online", labels=["host"])
        healthy = unhealthy = 0
        hottest = power = used = total = utilisation = 0.0
        reporting = 0
        for host in self.state.fleet.hosts.values():
            up.add_metric([host.host], 1.0 if host.online else 0.0)
            if not host.online or host.telemetry is None:
                continue
            for gpu in host.telemetry.gpus:
                if not gpu.healthy:
                    unhealthy += 1
                    continue
                healthy += 1
                hottest = max(hottest, gpu.temperature_c or 0.0)
                power += gpu.power_w or 0.0
                used += gpu.memory_used_bytes or 0
                total += gpu.memory_total_bytes or 0
                if gpu.utilization_gpu_pct is not None:
                    utilisation += gpu.utilization_gpu_pct
                    reporting += 1
        yield up
        gpus = GaugeMetricFamily("llmops_fleet_gpus", "GPUs of online hosts by health",
                                 labels=["state"])
        gpus.add_metric(["healthy"], healthy)
        gpus.add_metric(["unhealthy"], unhealthy)
        yield gpus
        yield GaugeMetricFamily("llmops_fleet_gpu_temperature_max_celsius",
                                "Hottest healthy GPU", value=hottest)
        yield GaugeMetricFamily("llmops_fleet_gpu_power_watts", "Power of all healthy GPUs",
                                value=power)
        yield GaugeMetricFamily("llmops_fleet_gpu_memory_used_bytes", "GPU memory in use",
                                value=used)
        yield GaugeMetricFamily("llmops_fleet_gpu_memory_total_bytes", "GPU memory in all",
                                value=total)
        yield GaugeMetricFamily("llmops_fleet_gpu_utilization_ratio",
                                "Mean utilisation of healthy GPUs (0-1)",
                                value=utilisation / reporting / 100 if reporting else 0.0)


def registry_for(state: ControllerState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(state))
    # The process's own RSS, CPU seconds and open files (process_resident_memory_bytes, ...):
    # what a leak or a controller running out of CPU shows up in first. A private registry
    # does not get them by default.
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
