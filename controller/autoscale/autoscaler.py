"""The autoscaler: every interval, per deployment with autoscaling on or advisory, one decision.

Load signals from its replicas' telemetry (:mod:`.signals`) -> the forecaster learns the load
(tokens/s) and forecasts it one cold start ahead (the median of the deployment's own recent
placement-to-ready times) -> the capacity per replica learned from the same window
(:mod:`.capacity`) -> how many more replicas the fleet could place now (the scheduler, asked
for every replica the deployment may still add) -> :func:`.policy.decide`. Every decision is
recorded (SQLite, :mod:`.store`) and logged (``autoscale_decision``) with its inputs, forecast,
capacity and rule. In mode ``on`` a changed desired count is written with the engine's
``scale`` (by ``autoscaler``): the autoscaler writes desired counts, the reconciler alone
changes replicas. Forecasters, policy windows and learned capacities are checkpointed to a file
and restored at start-up.
"""

from __future__ import annotations

import math
import os
import pickle
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from llm_ops_helper.controller.autoscale.capacity import Slo, learn
from llm_ops_helper.controller.autoscale.forecast import ConformalForecaster, chosen_forecaster
from llm_ops_helper.controller.autoscale.policy import (
    Decision,
    PolicyConfig,
    PolicyInputs,
    PolicyState,
    decide,
)
from llm_ops_helper.controller.autoscale.signals import Load, LoadTracker
from llm_ops_helper.controller.autoscale.store import DecisionStore
from llm_ops_helper.controller.deployments.errors import DeploymentError
from llm_ops_helper.controller.deployments.models import gpu_need
from llm_ops_helper.controller.deployments.reconciler import Deployments
from llm_ops_helper.controller.deployments.scheduler import (
    PlacementRequest,
    Reservation,
    host_view,
    place,
)
from llm_ops_helper.controller.deployments.store import Deployment
from llm_ops_helper.proto.messages import ReplicaSample

log = structlog.get_logger("llmops.controller.autoscale")

# Cold starts remembered per deployment; the horizon is their median.
COLD_STARTS_KEPT = 20


@dataclass(frozen=True, slots=True)
class AutoscalerConfig:
    interval_s: float = 5.0
    default_cold_start_s: float = 60.0
    capacity_step: float = 0.25


@dataclass
class Tracked:
    """What the autoscaler keeps per deployment (and checkpoints)."""

    forecaster: ConformalForecaster
    capacity: float
    capacity_start: float
    policy: PolicyState = field(default_factory=PolicyState)
    cold_starts: dict[str, float] = field(default_factory=dict)
    last_at: float = float("-inf")


class Autoscaler:
    def __init__(self, engine: Deployments, store: DecisionStore,
                 new_forecaster: Callable[[int], ConformalForecaster] | None = None,
                 config: AutoscalerConfig = AutoscalerConfig(),
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.store = store
        # By default the forecaster bench/autoscale.py chose by measurement (a 300 s moving
        # average with a conformal p90 bound), learning one value per interval.
        self.new_forecaster = new_forecaster or (
            lambda horizon: chosen_forecaster(horizon, config.interval_s))
        self.config = config
        self.clock = clock
        self.loads = LoadTracker()
        self.tracked: dict[str, Tracked] = {}
        self.decisions_made = 0
        self.scale_errors = 0

    # -- one pass ----------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """Decide every deployment due; the records made."""
        now = self.clock() if now is None else now
        out = []
        for name, d in list(self.engine.deployments.items()):
            mode = d.spec.autoscale.mode
            if mode == "off" or d.deleting:
                if name in self.tracked:
                    self.forget(name)
                continue
            t = self._tracked(d)
            interval = max(d.spec.autoscale.interval_s or 0.0, self.config.interval_s)
            if now - t.last_at < interval - 1e-6 and t.last_at > float("-inf"):
                continue
            t.last_at = now
            out.append(self.decide(d, t, now))
        for name in self.tracked.keys() - self.engine.deployments.keys():
            self.forget(name)
        return out

    def decide(self, d: Deployment, t: Tracked, now: float) -> dict[str, Any]:
        a = d.spec.autoscale
        records = self.engine.ledger.records_of(d.name)
        ready = sum(1 for r in records if r.phase == "active" and self.engine.observer.ready(r))
        for r in records:
            if r.ready_at is not None and r.ready_at >= r.created_at:
                t.cold_starts[r.name] = r.ready_at - r.created_at
        while len(t.cold_starts) > COLD_STARTS_KEPT:
            del t.cold_starts[next(iter(t.cold_starts))]
        cold_start = statistics.median(t.cold_starts.values()) if t.cold_starts \
            else self.config.default_cold_start_s
        load = self.loads.update(d.name, self._samples(d))
        interval = max(a.interval_s or 0.0, self.config.interval_s)
        point = upper = None
        trusted = False
        moved = "kept: no traffic measured"
        metrics_ok = load is not None and load.rates_known
        if load is not None and metrics_ok:
            steps = max(1, math.ceil(cold_start / interval))
            if t.forecaster.horizon != steps:  # the cold start moved: same model, new horizon
                t.forecaster = self._forecaster(steps, t.forecaster)
            t.forecaster.learn_one(load.tokens_per_s)
            f = t.forecaster.predict()
            point, upper, trusted = f.point, f.upper, f.ok
            estimate = learn(t.capacity, load, ready, Slo(a.ttft_slo_s, a.itl_slo_s),
                             self.config.capacity_step)
            t.capacity, moved = estimate.tokens_per_s, estimate.moved
        top = d.spec.max_replicas if d.spec.max_replicas is not None else d.spec.replicas
        budget = self._budget(d, top - d.spec.replicas)
        inputs = PolicyInputs(
            now=now, current=d.spec.replicas, ready=ready,
            load_tokens_per_s=load.tokens_per_s if load is not None and metrics_ok else None,
            forecast_point=point, forecast_upper=upper, forecast_ok=trusted,
            requests_waiting=load.requests_waiting if load is not None else 0.0,
            capacity_tokens_per_s=t.capacity, budget=budget, metrics_ok=metrics_ok)
        low = max(d.spec.min_replicas, 1)  # none left would leave no metrics to scale up on
        config = PolicyConfig(min_replicas=low, max_replicas=max(top, low),
                              target_utilization=a.target_utilization,
                              scale_down_window_s=a.scale_down_window_s,
                              cold_start_s=cold_start, queue_per_replica=a.queue_per_replica,
                              mode=a.mode)
        decision, t.policy = decide(inputs, config, t.policy)
        if load is None:
            decision = _no_metrics(decision, "none of its replicas reports metrics yet")
        elif not load.rates_known:
            decision = _no_metrics(decision, "the first snapshot of its replicas' counters "
                                   "(rates need two)")
        applied, error = False, None
        if a.mode == "on" and decision.apply and decision.desired != d.spec.replicas:
            try:
                self.engine.scale(d.name, decision.desired, by="autoscaler")
                applied = True
            except DeploymentError as exc:
                self.scale_errors += 1
                error = exc.message
        record = decision_record(d.name, now, decision, load, cold_start, horizon_s=cold_start,
                                 capacity_moved=moved, applied=applied, error=error)
        self.store.add(d.name, now, record)
        self.decisions_made += 1
        log.info("autoscale_decision", deployment=d.name, mode=a.mode,
                 current=record["current"], desired=decision.desired, rule=decision.rule,
                 applied=applied, reason=decision.reason, error=error)
        return record

    def _samples(self, d: Deployment) -> list[tuple[float, ReplicaSample]]:
        out = []
        for r in self.engine.ledger.records_of(d.name):
            host = self.engine.fleet.hosts.get(r.host)
            if host is None or host.telemetry is None:
                continue
            s = self.engine.observer.replicas_of(r.host).get(r.name)
            if s is not None:
                out.append((host.telemetry.ts, s))
        return out

    def _budget(self, d: Deployment, wanted: int) -> int | None:
        """Replicas of ``d`` the fleet could place now (at most ``wanted``)."""
        if wanted <= 0:
            return 0
        try:
            rev = self.engine.ledger.revision(d)
        except DeploymentError:
            return None
        alerts = list(self.engine.firing())
        hosts = [host_view(s, alerts) for s in self.engine.fleet.hosts.values()]
        need = gpu_need(rev.spec, rev.runtime, rev.model, hosts)
        reservations = [Reservation(r.host, tuple(r.gpus), r.spec.gpu_memory_bytes or 0)
                        for r in self.engine.ledger.records.values()
                        if r.phase == "active" and r.gpus and not self.engine.observer.ready(r)]
        existing = Counter(r.host for r in self.engine.ledger.records_of(d.name)
                           if r.phase == "active")
        request = PlacementRequest(d.name, rev.runtime, rev.spec.gpus_per_replica, need, wanted)
        return len(place(request, hosts, reservations, existing).placed)

    def _forecaster(self, steps: int, old: ConformalForecaster | None) -> ConformalForecaster:
        f = self.new_forecaster(steps)
        if old is not None:  # keep what the point model learned; the error window restarts
            f.model = old.model
        return f

    def _tracked(self, d: Deployment) -> Tracked:
        start = d.spec.autoscale.capacity_tokens_per_s
        t = self.tracked.get(d.name)
        if t is None or t.capacity_start != start:  # new, or the user gave a new start
            steps = max(1, math.ceil(self.config.default_cold_start_s / self.config.interval_s))
            t = self.tracked[d.name] = Tracked(self._forecaster(steps, None), start, start)
        return t

    def forget(self, name: str) -> None:
        self.tracked.pop(name, None)
        self.loads.forget(name)

    def decisions(self, name: str, limit: int = 100) -> list[bytes]:
        return self.store.decisions(name, limit)

    # -- checkpoints -------------------------------------------------------------------------

    def snapshot(self) -> Callable[[Path], None]:
        """The state now, as bytes; the returned function writes them (in a worker thread)."""
        data = pickle.dumps({name: (t.forecaster, t.capacity, t.capacity_start, t.policy,
                                    t.cold_starts) for name, t in self.tracked.items()})

        def write(path: Path) -> None:
            tmp = path.with_suffix(path.suffix + ".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        return write

    def save(self, path: Path) -> None:
        self.snapshot()(path)

    def restore(self, path: Path) -> int:
        """Load a checkpoint written by :meth:`save`; how many deployments it held. A file
        that cannot be read is logged and ignored: the forecasters start afresh."""
        if not path.exists():
            return 0
        try:
            with open(path, "rb") as f:
                saved = pickle.load(f)  # the controller's own state file
            tracked = {name: Tracked(fc, cap, start, policy, dict(cold))
                       for name, (fc, cap, start, policy, cold) in saved.items()}
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError,
                TypeError, ValueError) as exc:
            log.warning("autoscale_checkpoint_unreadable", path=str(path), error=str(exc))
            return 0
        self.tracked.update(tracked)
        return len(tracked)


def _no_metrics(decision: Decision, why: str) -> Decision:
    if decision.rule != "no_metrics":
        return decision
    current = decision.inputs.current
    reason = f"no metrics yet ({why}): holding {current} replica{'s' if current != 1 else ''}"
    return Decision(decision.desired, decision.rule, reason, decision.apply, None, None,
                    decision.inputs)


def decision_record(name: str, ts: float, decision: Decision, load: Load | None,
                    cold_start_s: float, horizon_s: float, capacity_moved: str, applied: bool,
                    error: str | None) -> dict[str, Any]:
    """What GET .../decisions serves and the table keeps: one decision, explained."""
    i = decision.inputs
    return {
        "ts": ts, "deployment": name, "current": i.current, "desired": decision.desired,
        "rule": decision.rule, "reason": decision.reason, "applied": applied, "error": error,
        "needed": decision.needed, "demand_tokens_per_s": decision.demand_tokens_per_s,
        "inputs": None if load is None else {
            "replicas_reporting": load.replicas, "ready": i.ready,
            "requests_per_s": load.requests_per_s, "failed_per_s": load.failed_per_s,
            "prompt_tokens_per_s": load.prompt_tokens_per_s,
            "generation_tokens_per_s": load.generation_tokens_per_s,
            "tokens_per_s": load.tokens_per_s, "requests_running": load.requests_running,
            "requests_waiting": load.requests_waiting, "kv_cache_usage": load.kv_cache_usage,
            "ttft_mean_s": load.ttft_mean_s, "itl_mean_s": load.itl_mean_s,
            "ttft_p90_s": load.ttft_p90_s, "itl_p90_s": load.itl_p90_s},
        "forecast": {"point": i.forecast_point, "upper": i.forecast_upper,
                     "trusted": i.forecast_ok, "horizon_s": horizon_s},
        "capacity": {"tokens_per_s": i.capacity_tokens_per_s, "learning": capacity_moved},
        "cold_start_s": cold_start_s, "budget": i.budget,
    }
