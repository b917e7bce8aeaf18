"""Tokens per second one replica sustains within the deployment's latency SLO, learned.

The configured value is only where the estimate starts. Each window with traffic says
something about it:

- the SLO holds (mean time to first token and mean inter-token latency within their
  objectives) while the replicas are busy (requests waiting, or the KV cache nearly full): each
  replica sustained the observed tokens/s within the SLO, so capacity is at least that; a lower
  estimate rises towards it;
- the SLO is violated: each replica could not keep the observed tokens/s within the SLO, so
  capacity is at most that; a higher estimate falls towards it.

Each move is bounded to ``step`` (a fraction of the estimate) per window, so one odd window
(a burst of long prompts) cannot swing it far. A window that says neither (idle replicas
meeting the SLO, or no latency measured) leaves it alone. Pure: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_ops_helper.controller.autoscale.signals import Load

# KV-cache usage at which a replica counts as busy though nothing waits yet.
BUSY_KV_USAGE = 0.9


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_s: float
    itl_s: float


@dataclass(frozen=True, slots=True)
class Estimate:
    tokens_per_s: float
    moved: str
    """What the last window did to it: "raised", "lowered" or "kept", and why."""


def learn(estimate: float, load: Load, ready: int, slo: Slo, step: float = 0.25) -> Estimate:
    """The estimate after one window of ``load`` served by ``ready`` replicas."""
    if ready <= 0 or not load.rates_known or load.tokens_per_s <= 0:
        return Estimate(estimate, "kept: no traffic measured")
    per_replica = load.tokens_per_s / ready
    # The SLO holds on the p90 where agents report it, else on the mean.
    ttft, ttft_kind = ((load.ttft_p90_s, "p90") if load.ttft_p90_s is not None
                       else (load.ttft_mean_s, "mean"))
    itl, itl_kind = ((load.itl_p90_s, "p90") if load.itl_p90_s is not None
                     else (load.itl_mean_s, "mean"))
    violated = [f"{name} {kind} {value:.3g} s > SLO {limit:.3g} s"
                for name, kind, value, limit in (("TTFT", ttft_kind, ttft, slo.ttft_s),
                                                 ("ITL", itl_kind, itl, slo.itl_s))
                if value is not None and value > limit]
    if violated:
        if per_replica >= estimate:
            return Estimate(estimate, f"kept: {'; '.join(violated)} at {per_replica:.3g} "
                            "tokens/s per replica, above the estimate already")
        lowered = max(per_replica, estimate * (1 - step))
        return Estimate(lowered, f"lowered: {'; '.join(violated)} at {per_replica:.3g} "
                        "tokens/s per replica")
    if ttft is None and itl is None:
        return Estimate(estimate, "kept: no latency measured")
    busy = load.requests_waiting > 0 or (load.kv_cache_usage or 0.0) >= BUSY_KV_USAGE
    if busy and per_replica > estimate:
        raised = min(per_replica, estimate * (1 + step))
        return Estimate(raised, f"raised: {per_replica:.3g} tokens/s per replica sustained "
                        "within the SLO while busy")
    return Estimate(estimate, "kept: the SLO holds" + ("" if busy else ", replicas not busy"))
