"""One supervised replica: what the supervisor knows of it, and what the state file keeps."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

from llm_ops_helper.agent.replicas import statefile
from llm_ops_helper.agent.replicas.process import Child
from llm_ops_helper.agent.runtimes.base import LaunchPlan, Runtime
from llm_ops_helper.proto.messages import ReplicaSpec, ReplicaState

NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# A stopped replica is still reported this long (the controller sees it end), then forgotten.
STOPPED_KEPT_S = 60.0
# A failed one (no process, nothing to adopt) longer, so its reason can be read, then too.
FAILED_KEPT_S = 3600.0
# Readiness and drain polling; readiness starts at FIRST_PROBE_S and grows to POLL_S.
POLL_S = 0.25
FIRST_PROBE_S = 0.02
SCRAPED_STATES: tuple[ReplicaState, ...] = ("starting", "ready", "draining")
USING_ARTIFACT: tuple[ReplicaState, ...] = ("pending", "fetching", "starting", "ready",
                                            "draining")


class ReplicaFailed(Exception):
    """Ends a replica's life as failed, with the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class Replica:
    spec: ReplicaSpec
    spec_hash: str
    runtime: Runtime
    state: ReplicaState = "pending"
    reason: str | None = None
    port: int | None = None
    plan: LaunchPlan | None = None
    url: str | None = None
    model_path: Path | None = None
    child: Child | None = None
    restarts: int = 0
    started_at: float | None = None
    ever_ready: bool = False
    exits: list[float] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    stopper: asyncio.Task[None] | None = None
    # The stopper's drain, while it runs: a stop without drain cancels it.
    drainer: asyncio.Task[None] | None = None
    drain_cut: bool = False
    # A stop was asked for (kept in the state file).
    stopping: bool = False
    stopped_at: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def record(self) -> statefile.ReplicaRecord:
        child = self.child
        return statefile.ReplicaRecord(
            spec=self.spec, spec_hash=self.spec_hash, state=self.state, reason=self.reason,
            port=self.port, pid=child.pid if child else None, pgid=child.pgid if child else None,
            start_ticks=child.start_ticks if child else None,
            boot_id=child.boot_id if child else "",
            create_time=child.create_time if child else None, restarts=self.restarts,
            started_at=self.started_at, ever_ready=self.ever_ready, stopping=self.stopping)


def advertised_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
