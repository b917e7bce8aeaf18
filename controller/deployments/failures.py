"""What the engine does when replicas or a rollout fail: back off, avoid the host, roll back.

A replica that fails outside a rollout is replaced after a backoff per deployment (10 s
doubling to 5 min, reset once the deployment has been available for a minute since the last
failure), away from the host it failed on while another host fits. A rollout whose new
replicas fail goes back to the last revision that completed, unless that one can no longer run
(its version retired, its artifact gone): then it fails where it stands.
"""

from __future__ import annotations

import msgspec

from llm_ops_helper.controller.deployments.errors import DeploymentError
from llm_ops_helper.controller.deployments.ledger import Ledger
from llm_ops_helper.controller.deployments.models import ModelResolver, resolve
from llm_ops_helper.controller.deployments.rollout import Plan
from llm_ops_helper.controller.deployments.store import Deployment, Revision

# A deployment whose replicas keep failing places no new one for 10 s after the first failure,
# doubling up to 5 minutes; the host that failed one is avoided (while another fits) this long.
BACKOFF_FIRST_S = 10.0
BACKOFF_MAX_S = 300.0
AVOID_HOST_S = 300.0
# A deployment is recovered (its next failure backs off from the start again) when it is
# available this long after its last failure. Not at once: a replica that crashes seconds after
# each start makes its deployment available between crashes, and resetting then kept the
# backoff at its first step forever (a re-placement every 10 s plus a crash loop, for ever).
RECOVERED_AFTER_S = 60.0


class Failures:
    def __init__(self, ledger: Ledger, registry: ModelResolver) -> None:
        self.ledger = ledger
        self.registry = registry
        # (deployment, host) -> until when new replicas of it avoid that host.
        self.avoid: dict[tuple[str, str], float] = {}

    def carry_out(self, d: Deployment, p: Plan, now: float) -> bool:
        """The plan's rollback, failed rollout or back-off; whether it rolled the deployment
        back (the rest of the plan is then void)."""
        if p.rollback is not None:
            stable = self.ledger.revision(d, d.stable)
            blocked = self.unavailable(stable)
            if blocked is None:
                self.ledger.mark_failed(d, p.rollback)
                self.roll_back(d, stable, p.rollback, "controller", now)
                return True
            # Nothing safe to go back to: the rollout fails where it stands.
            version = self.ledger.revision(d).version
            why = p.rollback.removeprefix(f"automatic rollback from {version}: ")
            p.rollback, p.phase = None, "failed"
            p.fail_rollout = f"{why}; no rollback to {stable.version}: {blocked}"
            p.message = f"rollout of {version} failed: {p.fail_rollout}"
        if p.fail_rollout is not None:
            d.failed = p.fail_rollout
            self.ledger.mark_failed(d, p.fail_rollout)
            self.ledger.event(d.name, "rollout_failed", p.message, now, level="warning")
        if p.failed and p.fail_rollout is None:
            self.back_off(d, p.failed, now)
        return False

    def roll_back(self, d: Deployment, source: Revision, reason: str, by: str,
                  now: float) -> None:
        spec = msgspec.structs.replace(source.spec, replicas=d.spec.replicas,
                                       min_replicas=d.spec.min_replicas,
                                       max_replicas=d.spec.max_replicas)
        self.ledger.add_revision(d, source.model, source.runtime, spec, by, reason, now,
                                 requested=source.requested, rolling_back=True,
                                 phase="rolling_back", message=reason)
        self.ledger.event(d.name, "rollback_started", reason, now, version=source.version,
                          level="warning")

    def unavailable(self, source: Revision) -> str | None:
        """Why a revision cannot be rolled back to now (its version retired or deleted, its
        artifact gone), or None."""
        try:
            resolve(self.registry, source.version)
        except DeploymentError as exc:
            return exc.message
        art = source.model.artifact
        if art is not None and not self.registry.has_artifact(art.sha256):
            return f"its artifact {art.sha256[:12]} is no longer in the repository"
        return None

    # -- backoff -----------------------------------------------------------------------------

    def back_off(self, d: Deployment, failed: list[tuple[str, str]], now: float) -> None:
        """Replicas failed: no new replica for a while (longer each time in a row), and not
        on the hosts they failed on while another fits."""
        d.failures += len(failed)
        d.last_failure = failed[-1][1]
        delay = backoff_s(d.failures)
        d.backoff_until = now + delay
        for name, _ in failed:
            record = self.ledger.records.get(name)
            if record is not None:
                self.avoid[(d.name, record.host)] = now + AVOID_HOST_S
        self.ledger.touch(d, now)
        self.ledger.event(d.name, "backoff", f"{plural(d.failures, 'replica failure')} in a "
                          f"row: no new replica for {delay:.0f} s", now, failures=d.failures,
                          level="warning")

    def avoided(self, name: str, now: float) -> set[str]:
        """The hosts new replicas of a deployment avoid now."""
        return {host for (deployment, host), until in self.avoid.items()
                if deployment == name and until > now}

    def prune(self, now: float) -> None:
        self.avoid = {k: until for k, until in self.avoid.items() if until > now}

    def waiting(self, d: Deployment, now: float) -> str | None:
        """Why no new replica is placed now (backing off), or None."""
        if d.backoff_until is None or now >= d.backoff_until:
            return None
        return (f"{plural(d.failures, 'replica failure')} in a row, no new replica for "
                f"{backoff_s(d.failures):.0f} s; the last: {d.last_failure}")

    def recovered(self, d: Deployment, now: float) -> None:
        """The deployment is available: once that is ``RECOVERED_AFTER_S`` after its last
        failure, the next failure backs off from the start again."""
        if not d.failures:
            return
        if d.backoff_until is not None:
            failed_at = d.backoff_until - backoff_s(d.failures)
            if now - failed_at < RECOVERED_AFTER_S:
                return
        d.failures, d.last_failure, d.backoff_until = 0, None, None
        self.ledger.touch(d, now)


def backoff_s(failures: int) -> float:
    return min(BACKOFF_FIRST_S * 2.0 ** min(max(failures - 1, 0), 16), BACKOFF_MAX_S)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
