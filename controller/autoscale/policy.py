"""How many replicas a deployment should have: a pure function from what is known now to a decision.

`decide` is the controller's predictive policy. It sizes the deployment for the forecast upper
bound of load one cold start ahead (replicas asked for now are serving only then) and for the
queue already waiting, then:

- **hold**: keeps every replica that any recommendation of the last cold-start window needed. A
  forecast made 40 s ago for a burst 20 s from now still needs its replica; dropping it now and
  asking again later would arrive a cold start too late.
- **stabilisation**: scales down only to the largest recommendation of the last
  ``scale_down_window_s`` (Kubernetes HPA's scale-down stabilisation), so a lull is not mistaken
  for the end of the traffic.
- **min/max**, then **budget**: never more new replicas than free GPUs without open critical
  alerts can take now (the caller counts them; ``None`` when unknown).

When the forecaster says its recent error is large (``forecast_ok`` false) the policy falls back
to reactive sizing on the current load. With no metrics it holds the current count.

`reactive` and `hpa` have the same shape, for the replay evaluation: `reactive` sizes for the
last load alone; `hpa` adds the scale-down stabilisation window, like the HPA.

The policy only returns desired counts; the autoscaler writes them (in mode ``on``) and the
reconciler alone changes replicas. In mode ``advisory`` the decision is made and explained but
``apply`` is false; in mode ``off`` it holds the current count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["off", "advisory", "on"]
MODES: tuple[Mode, ...] = ("off", "advisory", "on")
Rule = Literal["off", "no_metrics", "forecast", "reactive", "queue", "hold", "stabilisation",
               "min", "max", "budget"]


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """One deployment's autoscaling settings."""

    min_replicas: int = 1
    max_replicas: int = 8
    target_utilization: float = 0.8
    """Fraction of a replica's capacity to plan for (HPA's target utilisation)."""
    scale_down_window_s: float = 300.0
    cold_start_s: float = 60.0
    """Seconds from asking for a replica to its serving; measured from the deployment's own."""
    queue_per_replica: float = 8.0
    """Waiting requests one more replica absorbs."""
    mode: Mode = "on"

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < self.min_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, got "
                             f"{self.min_replicas} and {self.max_replicas}")
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"target_utilization must be in (0, 1], got "
                             f"{self.target_utilization}")
        if self.scale_down_window_s < 0 or self.cold_start_s < 0:
            raise ValueError("scale_down_window_s and cold_start_s must be >= 0")
        if self.queue_per_replica <= 0:
            raise ValueError(f"queue_per_replica must be > 0, got {self.queue_per_replica}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass(frozen=True, slots=True)
class PolicyInputs:
    """What is known at ``now`` (seconds, any monotonic origin)."""

    now: float
    current: int
    """Replicas requested: ready plus starting."""
    ready: int
    load_tokens_per_s: float | None
    """Load of the last measured interval; ``None`` when there is none."""
    forecast_point: float | None = None
    forecast_upper: float | None = None
    """Upper quantile of load one cold start ahead."""
    forecast_ok: bool = False
    """The forecaster's recent error is small enough to trust it."""
    requests_waiting: float = 0.0
    capacity_tokens_per_s: float | None = None
    """One replica's capacity; ``None`` while not yet learned."""
    budget: int | None = None
    """More replicas free GPUs without open critical alerts can take now; ``None``: unknown."""
    metrics_ok: bool = True


@dataclass(frozen=True, slots=True)
class PolicyState:
    """Recent recommendations ``(time, replicas)``, oldest first; returned anew by each call."""

    recommendations: tuple[tuple[float, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """A decision with the inputs, forecast and capacity it used and the rule that set it."""

    desired: int
    rule: Rule
    reason: str
    apply: bool
    """Whether the autoscaler should write ``desired`` (mode ``on``, not ``advisory``)."""
    needed: int | None
    """Replicas the demand alone needs now, before hold, stabilisation and limits."""
    demand_tokens_per_s: float | None
    inputs: PolicyInputs = field(repr=False)


def decide(inputs: PolicyInputs, config: PolicyConfig,
           state: PolicyState = PolicyState()) -> tuple[Decision, PolicyState]:
    """The predictive policy (see the module docstring)."""
    return _decide(inputs, config, state, use_forecast=True, hold_s=config.cold_start_s,
                   window_s=config.scale_down_window_s)


def reactive(inputs: PolicyInputs, config: PolicyConfig,
             state: PolicyState = PolicyState()) -> tuple[Decision, PolicyState]:
    """Replicas for the last load alone: no forecast, no hold, no stabilisation."""
    return _decide(inputs, config, state, use_forecast=False, hold_s=0.0, window_s=0.0)


def hpa(inputs: PolicyInputs, config: PolicyConfig,
        state: PolicyState = PolicyState()) -> tuple[Decision, PolicyState]:
    """Reactive with HPA's scale-down stabilisation over ``config.scale_down_window_s``."""
    return _decide(inputs, config, state, use_forecast=False, hold_s=0.0,
                   window_s=config.scale_down_window_s)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 10 else f"{x:.3g}"


def _plural(n: int) -> str:
    return f"{n} replica" if n == 1 else f"{n} replicas"


def _decide(inputs: PolicyInputs, config: PolicyConfig, state: PolicyState, *,
            use_forecast: bool, hold_s: float, window_s: float) -> tuple[Decision, PolicyState]:
    i, current = inputs, inputs.current
    apply = config.mode == "on"
    if config.mode == "off":
        return Decision(current, "off", f"autoscaling is off: holding {_plural(current)}",
                        False, None, None, i), state
    capacity = i.capacity_tokens_per_s
    if not i.metrics_ok or i.load_tokens_per_s is None or capacity is None or capacity <= 0:
        what = "capacity per replica not known yet" if i.metrics_ok and (
            i.load_tokens_per_s is not None) else "no metrics yet"
        return Decision(current, "no_metrics", f"{what}: holding {_plural(current)}",
                        apply, None, None, i), state

    per_replica = capacity * config.target_utilization
    rule: Rule
    if use_forecast and i.forecast_ok and i.forecast_upper is not None:
        demand, rule = i.forecast_upper, "forecast"
        why = (f"forecast upper bound {_fmt(demand)} tokens/s {_fmt(config.cold_start_s)} s "
               f"ahead")
    else:
        demand, rule = i.load_tokens_per_s, "reactive"
        why = f"current load {_fmt(demand)} tokens/s"
        if use_forecast:
            why += " (forecast not trusted: recent error large)" if i.forecast_upper is not None \
                else " (no forecast yet)"
    needed = math.ceil(max(demand, 0.0) / per_replica - 1e-9)
    why += (f" needs {_plural(needed)} at {_fmt(capacity)} tokens/s each and "
            f"{config.target_utilization:.0%} target utilisation")
    if i.requests_waiting > 0:
        for_queue = i.ready + math.ceil(i.requests_waiting / config.queue_per_replica)
        if for_queue > needed:
            needed, rule = for_queue, "queue"
            why = (f"{_fmt(i.requests_waiting)} requests waiting need {_plural(for_queue)} "
                   f"({i.ready} ready plus 1 per {_fmt(config.queue_per_replica)} waiting)")

    keep = max(hold_s, window_s)
    recent = tuple((t, n) for t, n in state.recommendations if t >= i.now - keep)
    new_state = PolicyState((*recent, (i.now, needed)))
    desired = needed
    # Inclusive: a forecast made exactly one cold start ago was for the load of right now.
    held = max((n for t, n in recent if t >= i.now - hold_s), default=0)
    if held > desired:
        desired, rule = held, "hold"
        why += (f"; holding {_plural(held)} that a forecast of the last "
                f"{_fmt(hold_s)} s (one cold start) needed")
    stable = max((n for t, n in recent if t > i.now - window_s), default=0)
    if stable > desired:
        desired, rule = stable, "stabilisation"
        why += (f"; scale-down stabilisation keeps the largest recommendation of the last "
                f"{_fmt(window_s)} s, {_plural(stable)}")
    if desired < config.min_replicas:
        desired, rule = config.min_replicas, "min"
        why += f"; raised to the minimum, {_plural(desired)}"
    elif desired > config.max_replicas:
        desired, rule = config.max_replicas, "max"
        why += f"; capped at the maximum, {_plural(desired)}"
    if i.budget is not None and desired > current + max(i.budget, 0):
        desired, rule = current + max(i.budget, 0), "budget"
        why += (f"; only {max(i.budget, 0)} more can be placed on GPUs without open critical "
                f"alerts, so {_plural(desired)}")
    change = "no change" if desired == current else f"from {current}"
    reason = f"{why}: desired {desired} ({change})"
    if config.mode == "advisory":
        reason += "; advisory mode, not applied"
    return Decision(desired, rule, reason, apply, needed, demand, i), new_state
