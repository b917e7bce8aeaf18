"""The rollout planner: one deployment, its replicas as reported, and what to do next.

A pure function of its inputs (:func:`plan`), called on every reconcile pass, in the manner of
Kubernetes' Deployment controller: new replicas are added while the total stays within
``replicas + max_surge``; old ready ones are drained while the ready count stays at or above
``replicas - max_unavailable``; old ones that are not ready go at once, since they serve
nothing. Steady state is the same rule with nothing old: add what is missing, drain what is
too many (the scheduler's :func:`pick_victims` chooses, keeping the spread).

A replica of the revision being rolled out that fails (its agent says failed: a crash loop, an
exit at start, a ready timeout, a fetch error; or the controller's own deadline passes) stops
the rollout: back to the last revision that completed when there is one and rollback is
automatic, else the deployment is failed with that reason and nothing more is started. The
canary comparison (:func:`judge`) holds the rollout once the first new replica is ready, for
``rollback.observe_s``, and compares it with the old ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from llm_ops_helper.controller.deployments.scheduler import pick_victims
from llm_ops_helper.controller.deployments.spec import RollbackPolicy
from llm_ops_helper.controller.deployments.store import Deployment, Phase, RecordPhase

ForgetKind = Literal["stopped", "lost"]


@dataclass(frozen=True, slots=True)
class Timing:
    # A command its agent shows no sign of having applied is sent again after this long.
    retry_s: float = 10.0
    # A replica on a host offline this long is given up and placed elsewhere.
    lost_grace_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A replica record joined with what its agent reports about it."""

    name: str
    revision: int
    host: str
    created_at: float
    phase: RecordPhase = "active"
    sent_at: float = 0.0
    # What its agent reports (telemetry or a replica_state event, the newer); None: nothing.
    state: str | None = None
    reason: str | None = None
    # Its host reported since the controller started. Until then what the agent last said
    # (a snapshot from before a restart, or nothing) is unknown, not "not ready": the planner
    # neither stops, drains nor resends for it.
    observed: bool = False
    # The host reported since the last command: a replica it does not mention is not there.
    reported_after_send: bool = False
    host_online: bool = True
    offline_since: float | None = None
    # Controller-side failure: the agent refused the deploy command.
    failed: str | None = None
    ever_ready: bool = False
    # Never ready by then: failed (the controller's backstop behind the agent's ready timeout).
    deadline: float = float("inf")
    drain_timeout_s: float = 30.0
    # When it was first told to drain or stop (None: it was not).
    winding_since: float | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.host_online


@dataclass(frozen=True, slots=True)
class Forget:
    name: str
    kind: ForgetKind
    why: str


@dataclass
class Plan:
    create: int = 0
    drain: list[tuple[str, str]] = field(default_factory=list)
    stop: list[tuple[str, str]] = field(default_factory=list)
    forget: list[Forget] = field(default_factory=list)
    resend: list[str] = field(default_factory=list)
    # Replicas newly found failed, with the reason (they are in ``stop`` too).
    failed: list[tuple[str, str]] = field(default_factory=list)
    rollback: str | None = None
    fail_rollout: str | None = None
    start_canary: bool = False
    completed: bool = False
    remove: bool = False
    phase: Phase = "progressing"
    message: str = ""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def failure(r: ReplicaView, now: float) -> str | None:
    """Why an active replica counts as failed, or None."""
    if r.failed is not None:
        return r.failed
    if r.state == "failed":
        return f"replica {r.name} on {r.host} failed: {r.reason or 'no reason given'}"
    if r.observed and r.host_online and not r.ever_ready and r.state != "ready" \
            and now > r.deadline:
        last = r.state or "not reported"
        return (f"replica {r.name} on {r.host} not ready {now - r.created_at:.0f} s after it "
                f"was placed (last state: {last})")
    return None


def _retire(p: Plan, r: ReplicaView, why: str) -> None:
    """Take a replica out: drain it if it serves, stop it if it does not."""
    (p.drain if r.ready else p.stop).append((r.name, why))


def _winding_down(p: Plan, r: ReplicaView, now: float, timing: Timing) -> None:
    """A draining or stopping replica: gone yet, or does its command need repeating? A drain
    that has not finished by its timeout (plus some slack) becomes a stop, whatever the agent
    says meanwhile (still draining, or still ready because it refuses the command)."""
    if not r.host_online or not r.observed:
        return
    if r.state == "stopped" or (r.state is None and r.reported_after_send):
        p.forget.append(Forget(r.name, "stopped", f"{r.host} reports it stopped"))
        return
    waited = now - r.sent_at
    if r.phase == "draining":
        since = now - (r.sent_at if r.winding_since is None else r.winding_since)
        if since > r.drain_timeout_s + 3 * timing.retry_s:
            p.stop.append((r.name, f"still {r.state or 'there'} {since:.0f} s after the "
                                   "drain command"))
            return
        if r.state == "draining":
            return
    if waited >= timing.retry_s:
        p.resend.append(r.name)


def plan(d: Deployment, replicas: Sequence[ReplicaView], versions: Mapping[int, str],
         now: float, timing: Timing = Timing()) -> Plan:
    p = Plan()
    live: list[ReplicaView] = []
    for r in replicas:
        if not r.host_online and r.offline_since is not None \
                and now - r.offline_since > timing.lost_grace_s:
            p.forget.append(Forget(r.name, "lost", f"host {r.host} offline for "
                                   f"{now - r.offline_since:.0f} s (grace "
                                   f"{timing.lost_grace_s:.0f} s)"))
        elif r.phase != "active":
            _winding_down(p, r, now, timing)
        elif r.state == "stopped" and r.observed and r.failed is None:
            # Stopped by its agent (one restarting with stop_replicas_on_exit, an operator):
            # not a failure of its version; a replacement is placed.
            p.forget.append(Forget(r.name, "stopped", f"its agent on {r.host} stopped it ("
                                   f"{r.reason or 'no reason given'}); replacing it"))
        else:
            live.append(r)
    version = versions.get(d.revision, f"revision {d.revision}")

    if d.deleting:
        for r in live:
            if r.observed:  # a ready one is drained: wait until its host says which it is
                _retire(p, r, "deployment deleted")
        left = len(replicas) - len(p.forget)
        p.remove = left == 0
        p.phase, p.message = "deleting", f"deleting: {_plural(left, 'replica')} left"
        return p

    failing = [(r, why) for r in live if (why := failure(r, now)) is not None]
    failed_names = {r.name for r, _ in failing}
    for r, why in failing:
        p.failed.append((r.name, why))
        p.stop.append((r.name, why))
    rolling = d.stable != d.revision
    new_failures = [why for r, why in failing if r.revision == d.revision]
    failed = d.failed
    if new_failures and failed is None and rolling:
        why = new_failures[0]
        if d.stable is not None and d.spec.rollback.auto and not d.rolling_back:
            p.rollback = f"automatic rollback from {version}: {why}"
        else:
            p.fail_rollout = failed = why

    active = [r for r in live if r.name not in failed_names]
    new = [r for r in active if r.revision == d.revision]
    old = [r for r in active if r.revision != d.revision]
    new_ready = [r for r in new if r.ready]
    desired = d.spec.replicas
    if p.rollback is None and failed is None:
        _advance(p, d, new, old, now, timing)
    elif failed is not None and rolling and any(r.ready for r in old):
        # The old version still serves: the new one, which failed, serves no more.
        for r in new:
            if r.observed:
                _retire(p, r, f"rollout of {version} failed")
    for r in active:
        # Resent only when its host has reported since the command and does not mention it.
        if r.host_online and r.state is None and r.reported_after_send \
                and now - r.sent_at >= timing.retry_s:
            p.resend.append(r.name)

    if p.rollback is not None:
        p.phase, p.message = "rolling_back", p.rollback
    elif failed is not None:
        serving = [r for r in old if r.ready]
        keeps = f"; {_plural(len(serving), 'old replica')} keep serving" if serving else ""
        p.phase, p.message = "failed", f"rollout of {version} failed: {failed}{keeps}"
    elif not rolling:
        n = len(new_ready)
        if n >= desired - d.spec.max_unavailable:
            p.phase = "available"
        elif p.create or any(r.state in (None, "pending", "fetching", "starting") for r in new):
            p.phase = "progressing"
        else:
            p.phase = "degraded"
        p.message = f"{n}/{desired} replicas of {version} ready"
    elif len(new_ready) >= desired and not old:
        p.completed = True
        p.phase = "available"
        p.message = f"{len(new_ready)}/{desired} replicas of {version} ready"
    else:
        p.phase = "rolling_back" if d.rolling_back else "progressing"
        verb = "rolling back to" if d.rolling_back else "rolling out"
        p.message = (f"{verb} {version}: {len(new_ready)}/{desired} new replicas ready, "
                     f"{_plural(len(old), 'old replica')} left")
        if p.start_canary or (d.canary_started_at is not None and not d.canary_done):
            p.message += f"; observing the first new replica for " \
                         f"{d.spec.rollback.observe_s:.0f} s"
    return p


def _advance(p: Plan, d: Deployment, new: list[ReplicaView], old: list[ReplicaView],
             now: float, timing: Timing) -> None:
    """The rolling-update step (or, with nothing old, the scale step)."""
    desired, spec = d.spec.replicas, d.spec
    new_ready = [r for r in new if r.ready]
    old_ready = [r for r in old if r.ready]
    hold = False
    if old_ready and d.stable is not None and not d.rolling_back \
            and spec.rollback.observe_s > 0 and not d.canary_done:
        if d.canary_started_at is None:
            p.start_canary = hold = bool(new_ready)
        else:
            hold = True
    for r in old:
        # Not serving, so nothing to wait for; one on a host that is away (an agent
        # restarting) or not heard from since the controller started is left alone until it
        # is back or given up on.
        if not r.ready and r.host_online and r.observed:
            p.stop.append((r.name, f"not ready; replaced by revision {d.revision}"))
    drained = 0
    per_host = Counter(r.host for r in new + old_ready)  # keep the spread of what stays
    if old_ready and not hold:
        room = len(new_ready) + len(old_ready) - (desired - spec.max_unavailable)
        count = max(0, min(len(old_ready), room))
        for name in pick_victims(_victim_rows(old_ready), count, per_host):
            p.drain.append((name, f"rolling update to revision {d.revision}"))
            drained += 1
    if len(new) > desired:
        known = [r for r in new if r.observed]
        by_name = {r.name: r for r in known}
        for name in pick_victims(_victim_rows(known), min(len(known), len(new) - desired)):
            _retire(p, by_name[name], f"scale down to {desired}")
    elif old:
        kept = sum(1 for r in old if r.ready or not r.host_online or not r.observed) - drained
        room = desired + spec.max_surge - (len(new) + kept)
        p.create = 0 if hold else max(0, min(desired - len(new), room))
    else:
        p.create = desired - len(new)


def _victim_rows(rs: Sequence[ReplicaView]) -> list[tuple[str, str, str, float]]:
    return [(r.name, r.host, r.state or "pending", r.created_at) for r in rs]


# -- canary comparison -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Totals:
    """Request counters of a set of replicas over a window (sums of per-replica deltas)."""

    requests: float = 0.0  # finished + failed
    failed: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0

    def __add__(self, other: Totals) -> Totals:
        return Totals(self.requests + other.requests, self.failed + other.failed,
                      self.ttft_sum + other.ttft_sum, self.ttft_count + other.ttft_count)

    def since(self, baseline: Totals | None) -> Totals:
        """What happened after ``baseline``; counters that went backwards restarted from 0."""
        if baseline is None or self.requests < baseline.requests \
                or self.ttft_count < baseline.ttft_count:
            return self
        return Totals(self.requests - baseline.requests, self.failed - baseline.failed,
                      self.ttft_sum - baseline.ttft_sum, self.ttft_count - baseline.ttft_count)


def judge(old: Totals, new: Totals, policy: RollbackPolicy, old_version: str = "old",
          new_version: str = "new") -> str | None:
    """Why the new version is worse than the old by more than the margins; None if it is not
    (or if either side saw fewer than ``policy.min_requests`` requests: no verdict)."""
    if old.requests < policy.min_requests or new.requests < policy.min_requests:
        return None
    old_rate, new_rate = old.failed / old.requests, new.failed / new.requests
    if new_rate > old_rate + policy.error_rate_margin:
        return (f"error rate {new_rate:.1%} on {new_version} ({new.failed:.0f} of "
                f"{new.requests:.0f} requests) against {old_rate:.1%} on {old_version} "
                f"(margin {policy.error_rate_margin:.1%})")
    if old.ttft_count > 0 and new.ttft_count > 0:
        old_ttft, new_ttft = old.ttft_sum / old.ttft_count, new.ttft_sum / new.ttft_count
        if new_ttft > old_ttft * policy.ttft_ratio_margin:
            return (f"mean time to first token {new_ttft:.3f} s on {new_version} against "
                    f"{old_ttft:.3f} s on {old_version} (limit "
                    f"{policy.ttft_ratio_margin:g}x)")
    return None
