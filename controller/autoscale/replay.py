"""Replay a request trace through an autoscaling policy in virtual time, and score it.

The trace has the Azure LLM trace's columns ``TIMESTAMP,ContextTokens,GeneratedTokens``. Its
load is binned (tokens that arrived in each bin); for each bin the policy decides the replicas
in force during it from the bins before it only (`Stepper.observe` gets bin ``k - 1``'s load
before `Stepper.decide` is asked for bin ``k``). Replicas asked for become active
``cold_start_s`` later; scaling down is immediate, starting replicas first. A bin is short when
its active replicas' capacity is less than its load; billed replica-seconds count active and
starting replicas. The ideal is one bin's worth of replicas for each bin's own load, with no
cold start.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Protocol

from llm_ops_helper.controller.autoscale import policy as pol
from llm_ops_helper.controller.autoscale.forecast import ConformalForecaster, chosen_forecaster

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
POLICIES = ("predictive", "reactive", "hpa")


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Trace:
    times: list[float]
    """Seconds from the first request."""
    tokens: list[int]
    """Context plus generated tokens of each request."""


def _parse_time(text: str) -> float:
    """Seconds since the epoch of a naive ISO timestamp, with any number of fraction digits."""
    head, _, frac = text.strip().partition(".")
    if frac and not frac.isdigit():
        raise ValueError
    stamp = datetime.fromisoformat(head)
    return (stamp - datetime(1970, 1, 1, tzinfo=stamp.tzinfo)).total_seconds() + (
        float("0." + frac) if frac else 0.0)


def read_trace(path: Path) -> Trace:
    """Read a trace; raises `TraceError` naming the line of the first bad row."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc}") from None
    except csv.Error as exc:
        raise TraceError(f"{path}: not CSV: {exc}") from None
    if not rows:
        raise TraceError(f"{path}:1: empty file; expected a header {','.join(COLUMNS)}")
    header = [c.strip() for c in rows[0]]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise TraceError(f"{path}:1: header lacks {', '.join(missing)}; expected "
                         f"{','.join(COLUMNS)}")
    at = [header.index(c) for c in COLUMNS]
    times: list[float] = []
    tokens: list[int] = []
    previous = -math.inf
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(header):
            raise TraceError(f"{path}:{line}: {len(row)} fields, expected {len(header)}")
        stamp, context, generated = (row[i].strip() for i in at)
        try:
            t = _parse_time(stamp)
        except ValueError:
            raise TraceError(f"{path}:{line}: TIMESTAMP {stamp!r} is not a timestamp like "
                             f"2023-11-16 18:17:03.97996") from None
        try:
            n = int(context) + int(generated)
            if int(context) < 0 or int(generated) < 0:
                raise ValueError
        except ValueError:
            raise TraceError(f"{path}:{line}: ContextTokens {context!r} and GeneratedTokens "
                             f"{generated!r} must be whole numbers >= 0") from None
        if t < previous:
            raise TraceError(f"{path}:{line}: timestamps not sorted: {stamp} is earlier than "
                             f"the line before")
        previous = t
        times.append(t)
        tokens.append(n)
    if not times:
        raise TraceError(f"{path}:1: no requests after the header")
    return Trace([t - times[0] for t in times], tokens)


def bin_loads(trace: Trace, bin_s: float) -> list[float]:
    """Tokens that arrived in each bin ``[k * bin_s, (k + 1) * bin_s)``."""
    if bin_s <= 0:
        raise ValueError(f"bin must be > 0 seconds, got {bin_s}")
    loads = [0.0] * (int(trace.times[-1] // bin_s) + 1)
    for t, n in zip(trace.times, trace.tokens, strict=True):
        loads[int(t // bin_s)] += n
    return loads


class Stepper(Protocol):
    """A policy stepped through bins: it learns each bin's load, then decides the next."""

    def observe(self, load_tokens: float) -> None: ...

    def decide(self, now: float, current: int, ready: int) -> tuple[int, str]: ...


@dataclass(frozen=True, slots=True)
class Setup:
    bin_s: float
    capacity_tokens_per_s: float
    cold_start_s: float


class PolicyStepper:
    """Steps one of `policy`'s functions; the predictive one with a `ConformalForecaster`."""

    def __init__(self, setup: Setup, config: pol.PolicyConfig, name: str = "predictive",
                 forecaster: ConformalForecaster | None = None) -> None:
        if name not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
        self.setup, self.config, self.name = setup, config, name
        self._fn = {"predictive": pol.decide, "reactive": pol.reactive, "hpa": pol.hpa}[name]
        self.forecaster = forecaster if forecaster is not None else (
            default_forecaster(setup) if name == "predictive" else None)
        self._state = pol.PolicyState()
        self._load: float | None = None

    def observe(self, load_tokens: float) -> None:
        self._load = load_tokens / self.setup.bin_s
        if self.forecaster is not None:
            self.forecaster.learn_one(self._load)

    def decide(self, now: float, current: int, ready: int) -> tuple[int, str]:
        f = self.forecaster.predict() if self.forecaster is not None else None
        inputs = pol.PolicyInputs(
            now=now, current=current, ready=ready, load_tokens_per_s=self._load,
            forecast_point=f.point if f else None, forecast_upper=f.upper if f else None,
            forecast_ok=f.ok if f else False,
            capacity_tokens_per_s=self.setup.capacity_tokens_per_s)
        decision, self._state = self._fn(inputs, self.config, self._state)
        return decision.desired, decision.rule


def horizon_steps(setup: Setup) -> int:
    """Steps from the last known bin to the first bin a replica asked for now can serve."""
    return math.ceil(setup.cold_start_s / setup.bin_s) + 1


def default_forecaster(setup: Setup, quantile: float = 0.9) -> ConformalForecaster:
    """`forecast.chosen_forecaster` at one cold start ahead of the last bin."""
    return chosen_forecaster(horizon_steps(setup), setup.bin_s, quantile)


class Oracle:
    """Perfect foresight, for reference only: it reads future bins, which no policy can."""

    def __init__(self, loads: Sequence[float], setup: Setup, min_replicas: int = 1) -> None:
        per_bin = setup.capacity_tokens_per_s * setup.bin_s
        need = [max(min_replicas, math.ceil(x / per_bin - 1e-9)) for x in loads]
        c = math.ceil(setup.cold_start_s / setup.bin_s)
        # Ask for a replica one cold start before a bin needs it; release it once no bin within
        # a cold start does (holding it is then no dearer than asking again).
        self._plan = [max(need[k:k + c + 1]) for k in range(len(need))]
        self._k = 0

    def observe(self, load_tokens: float) -> None:
        self._k += 1

    def decide(self, now: float, current: int, ready: int) -> tuple[int, str]:
        return self._plan[self._k], "oracle"


@dataclass(frozen=True, slots=True)
class Row:
    t: float
    load_tokens: float
    desired_replicas: int
    active_replicas: int
    short: bool
    rule: str


@dataclass(frozen=True, slots=True)
class Summary:
    bins: int
    bin_s: float
    short_bins: int
    billed_replica_s: float
    active_replica_s: float
    ideal_replica_s: float

    @property
    def short_fraction(self) -> float:
        return self.short_bins / self.bins if self.bins else 0.0

    @property
    def billed_vs_ideal(self) -> float:
        return self.billed_replica_s / self.ideal_replica_s if self.ideal_replica_s else math.inf

    def text(self) -> str:
        return (f"{self.bins} bins of {self.bin_s:g} s: too few active replicas in "
                f"{self.short_bins} bins ({self.short_bins * self.bin_s:g} s, "
                f"{self.short_fraction:.1%} of the time); billed {self.billed_replica_s:,.0f} "
                f"replica-seconds (active plus starting), {self.billed_vs_ideal:.2f} x the "
                f"ideal {self.ideal_replica_s:,.0f}")


def replay(loads: Sequence[float], stepper: Stepper, setup: Setup,
           min_replicas: int = 1) -> list[Row]:
    """Run ``stepper`` over ``loads`` (tokens per bin) in virtual time.

    ``min_replicas`` are active at the start. The decision for bin ``k`` is asked after
    bin ``k - 1``'s load is observed and before bin ``k``'s is.
    """
    per_bin = setup.capacity_tokens_per_s * setup.bin_s
    ready_at = [0.0] * min_replicas  # when each requested replica is (or was) active
    rows: list[Row] = []
    for k, load in enumerate(loads):
        now = k * setup.bin_s
        if k:
            stepper.observe(loads[k - 1])
        ready = sum(1 for r in ready_at if r <= now + 1e-9)
        desired, rule = stepper.decide(now, len(ready_at), ready)
        if desired > len(ready_at):
            ready_at += [now + setup.cold_start_s] * (desired - len(ready_at))
        elif desired < len(ready_at):
            ready_at = sorted(ready_at)[:max(desired, 0)]  # starting ones go first
        active = sum(1 for r in ready_at if r <= now + 1e-9)
        rows.append(Row(now, load, len(ready_at), active, active * per_bin < load - 1e-9, rule))
    return rows


def summarize(rows: Sequence[Row], setup: Setup, min_replicas: int = 1) -> Summary:
    """Shortfall and replica-seconds of ``rows`` (any slice of a replay).

    The ideal is, for each bin, the replicas its own load needs (at least ``min_replicas``),
    as if they started instantly.
    """
    per_bin = setup.capacity_tokens_per_s * setup.bin_s
    ideal = sum(max(min_replicas, math.ceil(r.load_tokens / per_bin - 1e-9)) for r in rows)
    return Summary(len(rows), setup.bin_s, sum(r.short for r in rows),
                   sum(r.desired_replicas for r in rows) * setup.bin_s,
                   sum(r.active_replicas for r in rows) * setup.bin_s, ideal * setup.bin_s)


PREDICTIVE = pol.PolicyConfig(target_utilization=0.5, scale_down_window_s=0.0)
"""The predictive policy's settings for replays, chosen in bench/autoscale.py on the first half.

No stabilisation beyond the hold over one cold start; the bursty trace needs the head-room
of a 50 % target utilisation on top of the p90 bound.
"""


def stepper_for(name: str, setup: Setup, *, min_replicas: int = 1, max_replicas: int = 1000,
                target_utilization: float | None = None, window_s: float | None = None,
                quantile: float = 0.9) -> PolicyStepper:
    """A replay stepper for policy ``name`` with the CLI's defaults.

    Reactive sizes for the last bin at full utilisation, HPA at 80 % with a 300 s window;
    the predictive policy uses the settings `bench/autoscale.py` chose on held-in data.
    """
    defaults = {"predictive": (PREDICTIVE.target_utilization, PREDICTIVE.scale_down_window_s),
                "reactive": (1.0, 0.0), "hpa": (0.8, 300.0)}
    if name not in defaults:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
    util, window = defaults[name]
    config = replace(PREDICTIVE, min_replicas=min_replicas, max_replicas=max_replicas,
                     target_utilization=util if target_utilization is None
                     else target_utilization,
                     scale_down_window_s=window if window_s is None else window_s,
                     cold_start_s=setup.cold_start_s)
    forecaster = default_forecaster(setup, quantile) if name == "predictive" else None
    return PolicyStepper(setup, config, name, forecaster)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "load_tokens", "desired_replicas", "active_replicas", "short", "rule"])
        for r in rows:
            w.writerow([f"{r.t:g}", f"{r.load_tokens:g}", r.desired_replicas, r.active_replicas,
                        int(r.short), r.rule])
