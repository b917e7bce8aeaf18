"""The canary comparison: the first new replica of a rollout against the old ones.

Once the first new replica is ready the planner holds the rollout for ``rollback.observe_s``;
:class:`Canary` takes each replica's request counters then (its baseline, kept in memory only),
and when the window is over compares what the new and the old replicas served since
(:func:`~llm_ops_helper.controller.deployments.rollout.judge`). A bad verdict rolls back to the
last revision that completed when rollback is automatic, else fails the rollout.
"""

from __future__ import annotations

from llm_ops_helper.controller.deployments.failures import Failures
from llm_ops_helper.controller.deployments.ledger import Ledger
from llm_ops_helper.controller.deployments.observe import Observer
from llm_ops_helper.controller.deployments.rollout import ReplicaView, Totals, judge
from llm_ops_helper.controller.deployments.store import Deployment


class Canary:
    def __init__(self, ledger: Ledger, observer: Observer, failures: Failures) -> None:
        self.ledger = ledger
        self.observer = observer
        self.failures = failures
        # Deployment -> replica -> its counters when the window opened.
        self._baselines: dict[str, dict[str, Totals]] = {}

    def restart(self, now: float) -> None:
        """After a controller restart: a comparison under way starts again, since its baseline
        counters were in memory."""
        for d in self.ledger.deployments.values():
            if d.canary_started_at is not None and not d.canary_done:
                # The comparison window starts again once the first new replica is seen ready.
                d.canary_started_at = None
                self.ledger.touch(d, now)
                self.ledger.event(d.name, "canary_restarted", "the controller restarted during "
                                  "the canary comparison; its window starts again", now)

    def start(self, d: Deployment, now: float) -> None:
        d.canary_started_at = now
        baselines = {}
        for r in self.ledger.records_of(d.name):
            if r.name in self.observer.replicas_of(r.host):
                baselines[r.name] = self.observer.totals(r)
            elif r.revision == d.revision:
                # Ready by its event before any snapshot carried its counters: a server this
                # young counts from zero, so everything it reports is this window's.
                baselines[r.name] = Totals()
        self._baselines[d.name] = baselines
        self.ledger.event(d.name, "canary_started", f"holding the rollout "
                          f"{d.spec.rollback.observe_s:.0f} s to compare the first new "
                          "replica with the old ones", now)

    def forget(self, name: str) -> None:
        self._baselines.pop(name, None)

    def judge(self, d: Deployment, replica_views: list[ReplicaView], now: float) -> bool:
        """Judge the canary once its window is over; whether that rolled the deployment back."""
        started, policy = d.canary_started_at, d.spec.rollback
        if started is None or d.canary_done or now < started + policy.observe_s:
            return False
        baseline = self._baselines.pop(d.name, {})
        old, new = Totals(), Totals()
        for v in replica_views:
            # One without a baseline (it had no counters when the window opened) would count
            # its whole life: left out.
            if v.phase != "active" or not v.ready or v.name not in baseline:
                continue
            delta = self.observer.totals(self.ledger.records[v.name]).since(baseline[v.name])
            if v.revision == d.revision:
                new += delta
            else:
                old += delta
        d.canary_done = True
        self.ledger.touch(d, now)
        version = self.ledger.revision(d).version
        stable = self.ledger.revision(d, d.stable).version if d.stable is not None else "old"
        verdict = judge(old, new, policy, stable, version)
        if verdict is None:
            enough = min(old.requests, new.requests) >= policy.min_requests
            self.ledger.event(d.name, "canary_passed" if enough else "canary_inconclusive",
                              f"{version} against {stable} over {policy.observe_s:.0f} s: "
                              f"{new.requests:.0f} and {old.requests:.0f} requests", now,
                              old_requests=old.requests, new_requests=new.requests)
            return False
        reason = f"automatic rollback from {version}: {verdict}"
        self.ledger.event(d.name, "canary_failed", verdict, now, level="warning",
                          old_requests=old.requests, new_requests=new.requests)
        if d.spec.rollback.auto and d.stable is not None:
            self.ledger.mark_failed(d, reason)
            self.failures.roll_back(d, self.ledger.revision(d, d.stable), reason, "controller",
                                    now)
            return True
        d.failed = verdict
        self.ledger.mark_failed(d, verdict)
        return False
