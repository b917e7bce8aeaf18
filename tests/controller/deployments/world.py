"""A small world for the engine's tests: a real registry, a real fleet fed with wire messages,
and agents played by the test, which verify and apply the signed commands the engine publishes.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from llm_ops_helper.controller.deployments.commands import CommandSender
from llm_ops_helper.controller.deployments.reconciler import Deployments, EngineConfig
from llm_ops_helper.controller.deployments.store import DeploymentStore
from llm_ops_helper.controller.fleet import Fleet
from llm_ops_helper.controller.registry.records import NewVersion
from llm_ops_helper.controller.registry.registry import Registry
from llm_ops_helper.proto import codec
from llm_ops_helper.proto.messages import (
    Alert,
    Command,
    Event,
    GpuInfo,
    GpuSample,
    Histogram,
    ReplicaSample,
    ReplicaSpec,
    Status,
    StopReplica,
    Telemetry,
)
from llm_ops_helper.proto.signing import CommandVerifier
from llm_ops_helper.proto.topics import AgentTopic, TopicKind

GIB = 1 << 30
KEY_ID = "k1"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    yield body


def card(label: str) -> bytes:
    return f"# {label}\n[sim]\nttft_ms = 20.0\n".encode()


async def register(registry: Registry, model: str, label: str, **meta: Any) -> str:
    version = await registry.register(model, NewVersion(**meta), _chunks(card(label)))
    return version.ref


@dataclass
class Sent:
    host: str
    kind: str
    body: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.body["name"])


@dataclass
class World:
    tmp: Path
    clock: Clock = field(default_factory=Clock)
    fleet: Fleet = field(default_factory=Fleet)
    alerts: dict[str, Alert] = field(default_factory=dict)
    published: list[tuple[str, bytes]] = field(default_factory=list)
    # What each agent runs: host -> replica name -> its sample.
    agents: dict[str, dict[str, ReplicaSample]] = field(default_factory=dict)
    config: EngineConfig = field(default_factory=lambda: EngineConfig(
        command_retry_s=10.0, host_lost_grace_s=60.0))
    # Hosts whose agent is away: they send nothing.
    down: set[str] = field(default_factory=set)
    # Seconds each agent's clock is off from the controller's.
    skew: dict[str, float] = field(default_factory=dict)
    statuses: dict[str, Status] = field(default_factory=dict)
    # Whether the controller's broker link is up.
    link: bool = True
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.registry = Registry(self.tmp / "controller.db", self.tmp / "blobs",
                                 clock=self.clock)
        self.verifier = CommandVerifier({KEY_ID: b"secret"}, clock=self.clock)
        self.engine = self.new_engine()

    def secret_for(self, host: str) -> bytes:
        if host not in self.agents:
            raise KeyError(host)
        return b"secret"

    def new_engine(self) -> Deployments:
        sender = CommandSender(KEY_ID, self.secret_for,
                               lambda topic, payload: self.published.append((topic, payload)),
                               clock=self.clock)
        store = DeploymentStore(self.tmp / "controller.db")
        engine = Deployments(store, self.fleet, lambda: self.alerts.values(), self.registry,
                             sender, lambda sha, host: f"http://head:8470/api/v1/artifacts/{sha}?host={host}",
                             self.config, clock=self.clock)
        engine.link_up = lambda: self.link
        return engine

    # -- hosts -------------------------------------------------------------------------------

    def host(self, name: str, gpus: int = 1, gpu_gib: int = 80,
             runtimes: tuple[str, ...] = ("sim", "llamacpp")) -> None:
        self.agents.setdefault(name, {})
        self.down.discard(name)
        inventory = [GpuInfo(index=i, uuid=f"GPU-{name}-{i}", name="A100",
                             memory_total_bytes=gpu_gib * GIB) for i in range(gpus)]
        self.statuses[name] = Status(host=name, state="online", ts=self.clock(), run_id="run1",
                                     interval_s=1.0, gpus=inventory, runtimes=list(runtimes))
        self.fleet.apply_status(self.statuses[name], 0.0, self.clock())
        self._gpus = {**getattr(self, "_gpus", {}), name: (gpus, gpu_gib)}
        self.report(name)

    def restart(self, broker: bool = True) -> None:
        """The controller restarts: a new process (fleet and engine afresh, from SQLite). With
        the broker up, the agents' retained statuses arrive first; telemetry comes with the
        next :meth:`report` or :meth:`step`. Without it, the controller hears nothing."""
        self.engine.store.close()
        self.fleet = Fleet()
        self.clock.advance(0.5)
        self.link = broker
        self.engine = self.new_engine()
        if broker:
            self.broker_back()

    def broker_back(self) -> None:
        """The broker link (re)connects: the retained statuses arrive."""
        self.link = True
        for host, status in self.statuses.items():
            if host not in self.down:
                self.fleet.apply_status(status, 0.0, self.clock())

    def offline(self, name: str) -> None:
        self.down.add(name)
        self.fleet.apply_status(Status(host=name, state="offline", ts=self.clock(),
                                       reason="lost"), 0.0, self.clock())

    def report(self, *hosts: str) -> None:
        """Each host's telemetry snapshot, as of now."""
        for host in hosts or tuple(h for h in self.agents if h not in self.down):
            count, size = self._gpus[host]
            used = {i: 0 for i in range(count)}
            for r in self.agents[host].values():
                for i in r.gpus:
                    used[i] += GIB
            gpus = [GpuSample(index=i, uuid=f"GPU-{host}-{i}", memory_total_bytes=size * GIB,
                              memory_used_bytes=used[i]) for i in range(count)]
            self.fleet.apply_telemetry(
                Telemetry(host=host, run_id="run1", seq=next(self._seq),
                          ts=self.clock() + self.skew.get(host, 0.0),
                          interval_s=1.0, gpus=gpus,
                          replicas=list(self.agents[host].values())), 0.0, self.clock())

    # -- commands ----------------------------------------------------------------------------

    def take(self) -> list[Sent]:
        """The commands published since the last call, each verified as an agent would."""
        out = []
        for topic, payload in self.published:
            parsed = AgentTopic.parse(topic)
            assert parsed.kind is TopicKind.COMMANDS
            command = codec.decode(payload, Command)
            self.verifier.verify(command)  # raises CommandRejected
            out.append(Sent(parsed.host, command.kind, command.body))
        self.published.clear()
        return out

    def deliver(self, sent: list[Sent]) -> None:
        """Agents apply the commands: deploy -> starting; drain/stop -> stopped."""
        for s in sent:
            replicas = self.agents[s.host]
            if s.kind == "deploy_replica":
                spec = msgspec.convert(s.body, ReplicaSpec)
                if spec.name not in replicas:
                    replicas[spec.name] = ReplicaSample(
                        name=spec.name, runtime=spec.runtime, up=False, state="starting",
                        deployment=spec.deployment, version=spec.version, gpus=spec.gpus)
            else:
                stop = msgspec.convert(s.body, StopReplica)
                if stop.name in replicas:
                    self.set(s.host, stop.name, "stopped")

    def set(self, host: str, name: str, state: str, **fields: Any) -> None:
        old = self.agents[host][name]
        extra: dict[str, Any] = {"up": state == "ready"}
        if state == "ready":
            extra["url"] = f"http://{host}:9000/{name}/v1"
        self.agents[host][name] = msgspec.structs.replace(old, state=state, **(extra | fields))

    def ready_all(self) -> None:
        for host, replicas in self.agents.items():
            for name, r in replicas.items():
                if r.state in ("starting", "pending", "fetching"):
                    self.set(host, name, "ready")

    def event(self, host: str, name: str, state: str, reason: str | None = None) -> Event:
        self.set(host, name, state, reason=reason)
        r = self.agents[host][name]
        return Event(host=host, ts=self.clock() + self.skew.get(host, 0.0),
                     kind="replica_state", replica=name,
                     severity="warning" if state == "failed" else "info",
                     data={"state": state, "reason": reason, "deployment": r.deployment,
                           "version": r.version, "url": r.url, "restarts": 0})

    def traffic(self, host: str, name: str, requests: float, failed: float = 0.0,
                ttft_s: float = 0.1) -> None:
        self.set(host, name, "ready", metrics={"requests_finished_total": requests - failed,
                                               "requests_failed_total": failed},
                 histograms={"ttft_seconds": Histogram(sum=ttft_s * requests,
                                                       count=requests)})

    def step(self, seconds: float = 1.0) -> list[Sent]:
        """Time passes, agents report, the engine makes a pass: the commands it sent."""
        self.clock.advance(seconds)
        self.report()
        self.engine.tick()
        assert self.engine.tick_errors == 0
        return self.take()

    def running(self) -> dict[str, str]:
        """Replica name -> version, for every replica an agent runs and has not stopped."""
        return {n: r.version or "" for rs in self.agents.values() for n, r in rs.items()
                if r.state != "stopped"}
