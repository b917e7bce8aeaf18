"""The autoscaler's test world: the engine's (a real registry, fleet and SQLite, agents played
by the test) with an autoscaler on it, deciding when the test says."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llm_ops_helper.controller.autoscale.autoscaler import Autoscaler, AutoscalerConfig
from llm_ops_helper.controller.autoscale.store import DecisionStore
from llm_ops_helper.controller.deployments.spec import AutoscaleSpec, DeploymentSpec, RollbackPolicy
from llm_ops_helper.proto.messages import Histogram
from tests.controller.deployments.world import GIB, World, register


@dataclass
class Scene:
    world: World
    autoscaler: Autoscaler
    last: float = 0.0
    totals: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def deploy(self, name: str = "chat", replicas: int = 1, max_replicas: int = 4,
               gpu_gib: int = 10, **autoscale: Any) -> None:
        settings: dict[str, Any] = {"mode": "on", "capacity_tokens_per_s": 100.0,
                                    "ttft_slo_s": 0.5, "scale_down_window_s": 5.0} | autoscale
        spec = DeploymentSpec(model="tiny@1", replicas=replicas, min_replicas=1,
                              max_replicas=max_replicas, gpu_memory_bytes=gpu_gib * GIB,
                              rollback=RollbackPolicy(observe_s=0),
                              autoscale=AutoscaleSpec(**settings))
        self.world.engine.apply(name, spec)
        self.settle()

    def settle(self) -> None:
        """Commands delivered and replicas made ready, until nothing more is sent."""
        for _ in range(10):
            sent = self.world.step()
            self.world.deliver(sent)
            self.world.ready_all()
            if not sent:
                return

    def load(self, tokens_per_s: float, waiting: float = 0.0, ttft_s: float = 0.1) -> None:
        """Traffic at this rate since the last call, spread over the ready replicas (their
        counters grow), with this many requests waiting now."""
        now = self.world.clock()
        elapsed, self.last = now - self.last if self.last else 1.0, now
        ready = [(h, n) for h, rs in self.world.agents.items() for n, r in rs.items()
                 if r.state == "ready"]
        for host, name in ready:
            tokens, ttft_sum, count = self.totals.get(name, (0.0, 0.0, 0.0))
            tokens += tokens_per_s * elapsed / len(ready)
            ttft_sum, count = ttft_sum + ttft_s * 10, count + 10
            self.totals[name] = (tokens, ttft_sum, count)
            self.world.set(host, name, "ready", metrics={
                "generation_tokens_total": tokens, "requests_finished_total": tokens / 10,
                "requests_waiting": waiting / len(ready), "requests_running": 1.0},
                histograms={"ttft_seconds": Histogram(sum=ttft_sum, count=count)})

    def tick(self) -> dict[str, Any]:
        """A second passes; the autoscaler decides; the engine carries it out."""
        self.world.step(0.0)
        records = self.autoscaler.tick()
        assert len(records) == 1, records
        self.settle()
        return records[0]


@pytest.fixture
async def scene(tmp_path: Path) -> Scene:
    world = World(tmp_path)
    await register(world.registry, "tiny", "one")
    world.host("host-a")
    world.host("host-b")
    autoscaler = Autoscaler(world.engine, DecisionStore(tmp_path / "controller.db"),
                            config=AutoscalerConfig(interval_s=1.0, default_cold_start_s=2.0),
                            clock=world.clock)
    return Scene(world, autoscaler)
