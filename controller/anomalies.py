"""Per-series anomaly detection over the fleet's telemetry, scored in vectorised batches.

Ingest calls :meth:`Analytics.add` once per fresh snapshot: it turns the snapshot into a few
dozen numbers (one per series: each GPU's temperature, power, utilisation, memory, ECC rate and
throttling; the host's CPU and memory; each replica's queue, TTFT, inter-token latency and
error rate) and appends them to a buffer, which costs microseconds. Every
``batch_interval_s``, :meth:`Analytics.flush` scores the whole buffer with one
:class:`DetectorBank` call (every series' model is a row of numpy arrays; each value is scored
before it is learned), and turns the detections into explained records and held alerts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import structlog

from llm_ops_helper.controller.analytics.bank import DetectorBank
from llm_ops_helper.controller.rules import THROTTLE_REASONS, Condition
from llm_ops_helper.proto.messages import GpuSample, Histogram, ReplicaSample, Telemetry

log = structlog.get_logger("llmops.controller.analytics")

GPU_SERIES = ("temperature_c", "power_w", "utilization_pct", "memory_used_pct",
              "ecc_corrected_rate", "throttled")
HOST_SERIES = ("cpu_pct", "memory_used_pct")
REPLICA_SERIES = ("requests_waiting", "ttft_mean_s", "itl_mean_s", "error_rate")
_NAN = math.nan
# A host claiming more series than 64 GPUs and 100 replicas would have is not modelled (counted):
# one malformed or hostile agent must not grow the detectors without bound.
MAX_SERIES_PER_HOST = 64 * len(GPU_SERIES) + len(HOST_SERIES) + 100 * len(REPLICA_SERIES)
# Throttling that counts for the series: heat, power delivery, and the power cap.
_HELD_BACK = THROTTLE_REASONS | {"sw_power_cap"}


class Detection(msgspec.Struct, kw_only=True, frozen=True):
    """One anomaly, with what drove it: the series, the feature, and what was expected."""

    ts: float
    host: str
    series: str
    gpu: int | None = None
    replica: str | None = None
    value: float
    expected: float
    score: float
    feature: str
    summary: str


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    host: str
    gpu: int | None
    replica: str | None
    name: str

    @property
    def key(self) -> str:
        where = ("gpu", str(self.gpu)) if self.gpu is not None else (
            ("replica", self.replica) if self.replica is not None else ("host", "-"))
        return "|".join((self.host, *where, self.name))

    @classmethod
    def parse(cls, key: str) -> SeriesInfo:
        host, kind, rest = key.split("|", 2)
        where, name = rest.rsplit("|", 1)
        return cls(host, int(where) if kind == "gpu" else None,
                   where if kind == "replica" else None, name)

    def where(self) -> str:
        if self.gpu is not None:
            return f"{self.host} GPU {self.gpu}"
        if self.replica is not None:
            return f"{self.host} replica {self.replica}"
        return self.host


def _gpu_values(gpu: GpuSample, before: GpuSample | None) -> list[float]:
    used, total = gpu.memory_used_bytes, gpu.memory_total_bytes
    ecc = _NAN
    if before is not None and gpu.ecc_corrected_total is not None \
            and before.ecc_corrected_total is not None:
        ecc = float(max(0, gpu.ecc_corrected_total - before.ecc_corrected_total))
    if not gpu.healthy:  # a lost GPU's fields are not readings; rules alert on it
        return [_NAN] * len(GPU_SERIES)
    return [
        _NAN if gpu.temperature_c is None else gpu.temperature_c,
        _NAN if gpu.power_w is None else gpu.power_w,
        _NAN if gpu.utilization_gpu_pct is None else gpu.utilization_gpu_pct,
        100.0 * used / total if used is not None and total else _NAN,
        ecc,
        1.0 if _HELD_BACK.intersection(gpu.throttle_reasons) else 0.0,
    ]


def _mean_delta(now: Histogram | None, before: Histogram | None) -> float:
    if now is None or before is None or now.count <= before.count:
        return _NAN
    return (now.sum - before.sum) / (now.count - before.count)


def _replica_values(r: ReplicaSample, before: ReplicaSample | None) -> list[float]:
    if not r.up:
        return [_NAN] * len(REPLICA_SERIES)
    m, h = r.metrics, r.histograms
    bh = before.histograms if before is not None else {}
    error_rate = _NAN
    if before is not None and "requests_failed_total" in m:
        failed = m["requests_failed_total"] - before.metrics.get("requests_failed_total", 0.0)
        done = m.get("requests_finished_total", 0.0) - before.metrics.get(
            "requests_finished_total", 0.0)
        if failed >= 0 and failed + done > 0:
            error_rate = failed / (failed + done)
    return [
        m.get("requests_waiting", _NAN),
        _mean_delta(h.get("ttft_seconds"), bh.get("ttft_seconds")),
        _mean_delta(h.get("itl_seconds"), bh.get("itl_seconds")),
        error_rate,
    ]


def snapshot_values(t: Telemetry, before: Telemetry | None) -> list[float]:
    """Every series' value in one snapshot, in the order :func:`snapshot_series` names them."""
    values: list[float] = []
    prev_gpus = {g.index: g for g in before.gpus} if before else {}
    for gpu in t.gpus:
        values += _gpu_values(gpu, prev_gpus.get(gpu.index))
    if (hm := t.host_metrics) is not None:
        values.append(hm.cpu_pct)
        values.append(100.0 * hm.memory_used_bytes / hm.memory_total_bytes
                      if hm.memory_total_bytes else _NAN)
    if t.replicas:
        prev_replicas = {r.name: r for r in before.replicas} if before else {}
        for r in t.replicas:
            values += _replica_values(r, prev_replicas.get(r.name))
    return values


def snapshot_series(t: Telemetry) -> list[SeriesInfo]:
    """Which series :func:`snapshot_values` returns, in order (only for a new layout)."""
    infos = [SeriesInfo(t.host, gpu.index, None, n) for gpu in t.gpus for n in GPU_SERIES]
    if t.host_metrics is not None:
        infos += [SeriesInfo(t.host, None, None, n) for n in HOST_SERIES]
    infos += [SeriesInfo(t.host, None, r.name, n) for r in t.replicas for n in REPLICA_SERIES]
    return infos


def _layout(t: Telemetry) -> tuple[object, ...]:
    """What decides which series a snapshot has. The agent reports every GPU it found, in index
    order (a lost one as unhealthy), so the count and the last index stand for the list."""
    gpus = t.gpus
    return (len(gpus), gpus[-1].index if gpus else -1, t.host_metrics is None,
            *[r.name for r in t.replicas])


class Analytics:
    def __init__(self, bank: DetectorBank, resolve_after_s: float,
                 silenced: Callable[[SeriesInfo, float], bool] | None = None,
                 alert_after_samples: int = 0) -> None:
        self.bank = bank
        self.alert_after_samples = alert_after_samples
        self.learning_detections = 0
        self.resolve_after_s = resolve_after_s
        self.silenced = silenced
        self.infos: list[SeriesInfo | None] = [None] * len(bank.keys())
        for slot, key in enumerate(bank.keys()):
            if key:  # "" is a slot freed by forget
                self.infos[slot] = SeriesInfo.parse(key)
        self._layouts: dict[str, tuple[tuple[object, ...], np.ndarray]] = {}
        self.skipped_too_many_series = 0
        self._slots: list[np.ndarray] = []
        self._values: list[float] = []
        self._ts: list[tuple[float, int]] = []
        self.samples_total = 0
        self.detections_total = 0
        self.batch_seconds = 0.0

    def _slots_for(self, t: Telemetry) -> np.ndarray | None:
        layout = _layout(t)
        known = self._layouts.get(t.host)
        if known is not None and known[0] == layout:
            return known[1]
        infos = snapshot_series(t)
        if len(infos) > MAX_SERIES_PER_HOST:
            self.skipped_too_many_series += 1
            return None
        slots = np.fromiter((self._slot(info) for info in infos), np.int64, len(infos))
        self._layouts[t.host] = (layout, slots)  # one layout per host: its current one
        return slots

    def _slot(self, info: SeriesInfo) -> int:
        slot = self.bank.slot(info.key)
        if slot >= len(self.infos):
            self.infos.extend([None] * (slot + 1 - len(self.infos)))
        self.infos[slot] = info
        return slot

    def add(self, t: Telemetry, before: Telemetry | None) -> None:
        values = snapshot_values(t, before)
        if not values:
            return
        slots = self._slots_for(t)
        if slots is None:
            return
        self._slots.append(slots)
        self._values += values
        self._ts.append((t.ts, len(values)))

    @property
    def pending(self) -> int:
        """Samples buffered, not scored yet."""
        return len(self._values)

    def flush(self, limit: int | None = None
              ) -> tuple[list[Detection], list[tuple[Condition, float, float]]]:
        """Score what is buffered, oldest first (whole snapshots, about ``limit`` samples at
        most; all without one): the detections, and the anomaly alerts to hold as
        (condition, when it was seen, until when it holds)."""
        if not self._values:
            return [], []
        started = time.perf_counter()
        snapshots, count = len(self._ts), len(self._values)
        if limit is not None and limit < count:
            snapshots, count = 0, 0
            while snapshots < len(self._ts) and (count == 0 or count < limit):
                count += self._ts[snapshots][1]
                snapshots += 1
        batch = self._ts[:snapshots]
        slots = np.concatenate(self._slots[:snapshots])
        values = np.asarray(self._values[:count], dtype=np.float64)
        ts = np.repeat([t for t, _ in batch], [n for _, n in batch])
        del self._slots[:snapshots], self._values[:count], self._ts[:snapshots]
        result = self.bank.update(slots, values)
        self.samples_total += len(values)
        detections: list[Detection] = []
        holds: list[tuple[Condition, float, float]] = []
        hits = np.flatnonzero(result.is_anomaly)
        if hits.size and self.alert_after_samples:
            young = self.bank.learned(slots[hits]) <= self.alert_after_samples
            self.learning_detections += int(young.sum())
            hits = hits[~young]
        for i in hits:
            info = self.infos[int(slots[i])]
            assert info is not None
            at = float(ts[i])
            if self.silenced is not None and self.silenced(info, at):
                continue
            detection = self._explain(info, at, float(values[i]), float(result.expected[i]),
                                      float(result.score[i]), int(result.feature[i]))
            detections.append(detection)
            holds.append((Condition("anomaly", "warning", info.host, gpu=info.gpu,
                                    replica=info.replica, series=info.name,
                                    value=detection.value, summary=detection.summary),
                          at, at + self.resolve_after_s))
        self.detections_total += len(detections)
        self.batch_seconds = time.perf_counter() - started
        return detections, holds

    def _explain(self, info: SeriesInfo, ts: float, value: float, expected: float,
                 score: float, feature: int) -> Detection:
        name = self.bank.FEATURES[feature]
        summary = (f"{info.name} on {info.where()} is {value:.4g}, expected about "
                   f"{expected:.4g} (anomaly score {score:.2f}, driven by its {name})")
        return Detection(ts=ts, host=info.host, series=info.name, gpu=info.gpu,
                         replica=info.replica, value=value, expected=expected, score=score,
                         feature=name, summary=summary)

    def forget_host(self, host: str) -> int:
        """Drop the models of every series of ``host`` (it is gone); how many."""
        keys = [info.key for info in self.infos if info is not None and info.host == host]
        for slot in self.bank.forget(keys):
            self.infos[slot] = None
        self._layouts.pop(host, None)
        return len(keys)

    def save(self, path: Path) -> None:
        self.bank.save(path)
