"""The agent daemon: sample every interval, queue, publish, answer commands. One TaskGroup.

Phases, as uvicorn runs them: start-up (collectors built by ``__main__``; the replica
supervisor adopts what its state file lists), main loop (the sampler and the broker link side
by side; replicas run in the supervisor's tasks), shutdown (the stop event ends the sampler;
replicas are left running unless ``stop_replicas_on_exit``; the link publishes ``offline`` and
disconnects).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

import msgspec
import structlog

from llm_ops_helper import __version__
from llm_ops_helper.agent.collectors.base import Collector, GpuCollector, run_collectors
from llm_ops_helper.agent.commands import CommandHandler, Handler
from llm_ops_helper.agent.config import AgentConfig
from llm_ops_helper.agent.link import Link
from llm_ops_helper.agent.outbox import Outbox, Outgoing
from llm_ops_helper.agent.replicas.handlers import replica_handlers
from llm_ops_helper.agent.replicas.supervisor import Supervisor
from llm_ops_helper.proto.codec import encode
from llm_ops_helper.proto.messages import (
    AgentCounters,
    Command,
    Event,
    ReplicaSample,
    Status,
    Telemetry,
)
from llm_ops_helper.proto.signing import CommandVerifier
from llm_ops_helper.proto.topics import TopicKind, agent_topic
from llm_ops_helper.systemd_notify import Notifier

log = structlog.get_logger("llmops.agent")

CAPABILITIES = ["telemetry", "events", "commands.sync"]


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        collectors: list[Collector],
        *,
        gpus: GpuCollector | None,
        verifier: CommandVerifier,
        runtimes: list[str],
        notifier: Notifier | None = None,
        broker_password: str | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.config = config
        self.host = config.hostname
        self.collectors = collectors
        self.gpus = gpus
        self.runtimes = runtimes
        self.notifier = notifier or Notifier({})
        self.run_id = uuid.uuid4().hex[:12]
        self.seq = 0
        self.ticks_overrun = 0
        interval = config.telemetry.interval_s
        self.outbox = Outbox(telemetry_capacity=math.ceil(config.telemetry.buffer_s / interval))
        self.supervisor = supervisor
        handlers: dict[str, Handler] = {"sync": self._sync}
        self.capabilities = list(CAPABILITIES)
        if supervisor is not None:
            supervisor.emit = self.send_event
            replica_commands = replica_handlers(supervisor)
            handlers.update(replica_commands)
            self.capabilities += [f"commands.{kind}" for kind in replica_commands]
        # The last tick's scraped samples, for sync (merged with the supervisor's states).
        self._scraped: list[ReplicaSample] = []
        self.commands = CommandHandler(self.host, verifier, handlers)
        self.link = Link(config.broker, self.host, self.outbox, self.status, self._on_command,
                         password=broker_password)
        self._topics = {kind: agent_topic(self.host, kind) for kind in TopicKind}

    def status(self) -> Status:
        return Status(
            host=self.host, state="online", ts=time.time(), run_id=self.run_id,
            agent_version=__version__, interval_s=self.config.telemetry.interval_s,
            capabilities=self.capabilities, gpus=self.gpus.inventory() if self.gpus else [],
            runtimes=self.runtimes)

    async def _on_command(self, payload: bytes) -> None:
        result = await self.commands.handle(payload)
        if result is not None:
            self.outbox.put_urgent(Outgoing(self._topics[TopicKind.RESULTS], encode(result)))

    def send_event(self, event: Event) -> None:
        self.outbox.put_urgent(Outgoing(self._topics[TopicKind.EVENTS], encode(event)))

    def replica_samples(self, scraped: list[ReplicaSample]) -> list[ReplicaSample]:
        """Every replica: configured ones (not scraped yet: up=False) and supervised ones."""
        seen = {s.name for s in scraped}
        samples = scraped + [ReplicaSample(name=r.name, runtime=r.runtime, up=False)
                             for r in self.config.replicas if r.name not in seen]
        return self.supervisor.merge(samples) if self.supervisor is not None else samples

    async def _sync(self, command: Command) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "seq": self.seq,
            "replicas": [msgspec.to_builtins(s) for s in self.replica_samples(self._scraped)],
            "gpus": [g.uuid for g in (self.gpus.inventory() if self.gpus else [])],
        }

    def counters(self) -> AgentCounters:
        return AgentCounters(buffered=len(self.outbox), dropped_buffer_full=self.outbox.dropped,
                             reconnects=max(0, self.link.connects - 1),
                             ticks_overrun=self.ticks_overrun,
                             commands_rejected=dict(self.commands.rejected))

    async def _sample_once(self) -> None:
        tick = await run_collectors(self.collectors, self.config.collector_timeout_s)
        for stat in tick.stats:
            if not stat.ok:
                log.warning("collector_failed", collector=stat.name, error=stat.error,
                            duration_ms=stat.duration_ms)
        for event in tick.collected.events:
            log.warning("host_event", kind=event.kind, severity=event.severity, gpu=event.gpu,
                        message=event.message)
            self.send_event(event)
        self._scraped = tick.collected.replicas or []
        replicas = (self.supervisor.merge(self._scraped) if self.supervisor is not None
                    else self._scraped)
        self.seq += 1
        telemetry = Telemetry(
            host=self.host, run_id=self.run_id, seq=self.seq, ts=time.time(),
            interval_s=self.config.telemetry.interval_s, host_metrics=tick.collected.host,
            gpus=tick.collected.gpus or [], replicas=replicas,
            collectors=tick.stats, agent=self.counters())
        self.outbox.put_telemetry(Outgoing(self._topics[TopicKind.TELEMETRY], encode(telemetry),
                                           qos=self.config.telemetry.qos))

    async def _sample_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.telemetry.interval_s
        next_at = loop.time()
        while not stop.is_set():
            await self._sample_once()
            self.notifier.watchdog()
            next_at += interval
            if next_at < loop.time():  # a slow tick: skip the missed ones rather than burst
                self.ticks_overrun += 1
                next_at = loop.time() + interval
            try:
                async with asyncio.timeout_at(next_at):
                    await stop.wait()
            except TimeoutError:
                pass

    async def _stop_replicas_then(self, stop: asyncio.Event, link_stop: asyncio.Event) -> None:
        try:
            await stop.wait()
            if self.supervisor is not None and self.config.supervisor.stop_replicas_on_exit:
                await self.supervisor.stop_all()
        finally:
            link_stop.set()

    async def run(self, stop: asyncio.Event) -> None:
        ping_every = self.notifier.watchdog_interval_s
        if ping_every is not None and ping_every < self.config.telemetry.interval_s:
            log.warning("watchdog_too_short", watchdog_ping_s=ping_every,
                        interval_s=self.config.telemetry.interval_s,
                        hint="the watchdog is pinged once per tick; raise WatchdogSec")
        log.info("agent_started", run_id=self.run_id, version=__version__,
                 collectors=[c.name for c in self.collectors],
                 gpus=len(self.gpus.inventory()) if self.gpus else 0,
                 broker=f"{self.config.broker.host}:{self.config.broker.port}")
        if self.supervisor is not None:
            await self.supervisor.start()
        try:
            # The link outlives the stop by the replicas' own stop (stop_replicas_on_exit), so
            # their final replica_state events go out before the "offline" status.
            link_stop = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._sample_loop(stop))
                tg.create_task(self.link.run(link_stop))
                tg.create_task(self._stop_replicas_then(stop, link_stop))
                self.notifier.ready(f"publishing as {self.host}")
        finally:
            self.notifier.stopping()
            if self.supervisor is not None:
                await self.supervisor.close()
            for collector in self.collectors:
                await collector.close()
            log.info("agent_stopped", seq=self.seq, unsent=len(self.outbox))
