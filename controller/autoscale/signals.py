"""A deployment's load, from the latest telemetry of each of its replicas.

Counters (requests, prompt and generated tokens) become rates from the change between two
consecutive snapshots of the same replica, each over its own host's clock. A counter that went
backwards means the server restarted in between: it counts from zero, so the delta is its new
value (what was served before the restart and after the last snapshot is lost, never negative).
Gauges (requests running and waiting) are summed over the replicas; KV-cache usage is the
largest, the replica closest to refusing work.

Latency comes two ways. Each agent computes its replicas' p50/p90/p99 time to first token and
inter-token latency over its own scrape interval from the histogram buckets
(:mod:`llm_ops_helper.agent.collectors.quantiles`); the deployment's p90 here is the worst
replica's, the one its users wait on. The controller itself keeps only each histogram's sum
and count (:mod:`llm_ops_helper.proto.views` drops the buckets to keep ingest cheap), so it
also has windowed means: (sum delta) / (count delta), summed over the replicas.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from llm_ops_helper.proto.messages import ReplicaSample

COUNTERS = ("requests_finished_total", "requests_failed_total", "prompt_tokens_total",
            "generation_tokens_total")
HISTOGRAMS = ("ttft_seconds", "itl_seconds")


@dataclass(frozen=True, slots=True)
class Load:
    """One deployment's load over the last window (rates per second, gauges now)."""

    replicas: int
    """Replicas that reported metrics this time."""
    requests_per_s: float
    failed_per_s: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    requests_running: float
    requests_waiting: float
    kv_cache_usage: float | None
    ttft_mean_s: float | None
    itl_mean_s: float | None
    rates_known: bool
    # The worst replica's p90 over its last scrape interval (None: none reported one).
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    """At least one replica had a previous snapshot to take rates from."""

    @property
    def tokens_per_s(self) -> float:
        return self.prompt_tokens_per_s + self.generation_tokens_per_s


@dataclass(slots=True)
class _Seen:
    ts: float
    counters: dict[str, float]
    histograms: dict[str, tuple[float, float]]  # name -> (sum, count)


def _delta(now: float, before: float | None) -> float:
    if before is None or now < before:  # first seen, or reset by a restart: from zero
        return now
    return now - before


@dataclass
class LoadTracker:
    """Rates per deployment from successive replica snapshots. ``update`` takes the latest
    ``(ts, sample)`` of each replica of one deployment; a snapshot with the same ``ts`` as the
    last one (no news from its host) keeps that replica's last rates."""

    _seen: dict[str, dict[str, _Seen]] = field(default_factory=dict)
    _rates: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def update(self, deployment: str,
               samples: Iterable[tuple[float, ReplicaSample]]) -> Load | None:
        """The deployment's load now; ``None`` when none of its replicas reports metrics."""
        seen = self._seen.setdefault(deployment, {})
        rates = self._rates.setdefault(deployment, {})
        totals = dict.fromkeys(COUNTERS, 0.0)
        lat = {h: [0.0, 0.0] for h in HISTOGRAMS}
        running = waiting = 0.0
        kv: float | None = None
        p90: dict[str, float | None] = {"ttft": None, "itl": None}
        reporting, known = 0, False
        names: set[str] = set()
        for ts, s in samples:
            if not s.up or not (s.metrics or s.histograms):
                continue
            names.add(s.name)
            reporting += 1
            m = s.metrics
            running += m.get("requests_running", 0.0)
            waiting += m.get("requests_waiting", 0.0)
            if "kv_cache_usage" in m:
                kv = max(kv or 0.0, m["kv_cache_usage"])
            for key in p90:
                value = m.get(f"{key}_p90_seconds")
                if value is not None:
                    p90[key] = max(p90[key] or 0.0, value)
            now = _Seen(ts, {c: m[c] for c in COUNTERS if c in m},
                        {h: (v.sum, v.count) for h in HISTOGRAMS
                         if (v := s.histograms.get(h)) is not None})
            before = seen.get(s.name)
            if before is not None and ts > before.ts:
                dt = ts - before.ts
                r = {c: _delta(v, before.counters.get(c)) / dt for c, v in now.counters.items()}
                for h, (total, count) in now.histograms.items():
                    old = before.histograms.get(h)
                    if old is None or count < old[1]:  # a restart: from zero
                        r[h + ".sum"], r[h + ".count"] = total, count
                    else:
                        r[h + ".sum"], r[h + ".count"] = total - old[0], count - old[1]
                rates[s.name] = r
                seen[s.name] = now
            elif before is None:
                seen[s.name] = now
            last = rates.get(s.name)
            if last is None:
                continue
            known = True
            for c in COUNTERS:
                totals[c] += last.get(c, 0.0)
            for h in HISTOGRAMS:
                lat[h][0] += last.get(h + ".sum", 0.0)
                lat[h][1] += last.get(h + ".count", 0.0)
        for gone in seen.keys() - names:  # stopped replicas: their rates end with them
            del seen[gone]
            rates.pop(gone, None)
        if not reporting:
            return None
        return Load(replicas=reporting,
                    requests_per_s=totals["requests_finished_total"],
                    failed_per_s=totals["requests_failed_total"],
                    prompt_tokens_per_s=totals["prompt_tokens_total"],
                    generation_tokens_per_s=totals["generation_tokens_total"],
                    requests_running=running, requests_waiting=waiting, kv_cache_usage=kv,
                    ttft_mean_s=_mean(lat["ttft_seconds"]), itl_mean_s=_mean(lat["itl_seconds"]),
                    rates_known=known, ttft_p90_s=p90["ttft"], itl_p90_s=p90["itl"])

    def forget(self, deployment: str) -> None:
        self._seen.pop(deployment, None)
        self._rates.pop(deployment, None)


def _mean(sum_count: list[float]) -> float | None:
    total, count = sum_count
    return total / count if count > 0 else None
