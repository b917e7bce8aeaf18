"""The controller daemon: one TaskGroup, visible phases.

Start-up: state built from config (SQLite opened, firing alerts, detector and forecaster
checkpoints restored), the HTTP server bound. Main loop, side by side: the broker session
(ingest runs inside its receive loop), the scoring batches, the sweeper (staleness, held
alerts), the checkpointer, the autoscaler's decisions, the deployment engine and one sender
per webhook. Shutdown: the stop event ends the loops; the last batch is scored, the detectors
and forecasters are checkpointed and the HTTP server closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
from collections.abc import Callable

import structlog
from aiohttp import web

from llm_ops_helper.controller.api import build_app
from llm_ops_helper.controller.mqtt import ControllerLink
from llm_ops_helper.controller.state import ControllerState
from llm_ops_helper.systemd_notify import Notifier

log = structlog.get_logger("llmops.controller")

SWEEP_INTERVAL_S = 0.25
GC_FREEZE_INTERVAL_S = 1.0
PRUNE_INTERVAL_S = 3600.0
# Cycles that were alive at a freeze and died after wait for the next full collection: every two
# minutes keeps that memory a small sawtooth (ten minutes read as a leak in the soak test).
GC_FULL_COLLECTION_S = 120.0
# Samples scored in one step of the detectors (~10-15 ms at 2,000 hosts on this machine).
SCORE_STEP = 5_000


class GcPolicy:
    """Keep the cyclic collector off the fleet state.

    Thousands of snapshots a second are decoded, kept a second or two, and dropped: trees that
    reference counting frees, but every pass of the collector over the older generations
    walked all of them again (about half the controller's CPU at 2,000 hosts). Once a second,
    what is alive is moved out of the collector's sight (``gc.freeze``); every two minutes
    one full collection over everything finds what formed cycles (tasks, tracebacks) since.
    (Collecting only by hand, once a second, measured worse: 575 against 514 us a message.)
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last_full = clock()
        gc.freeze()

    def tick(self) -> None:
        if self.clock() - self.last_full >= GC_FULL_COLLECTION_S:
            gc.unfreeze()
            gc.collect()
            self.last_full = self.clock()
        gc.freeze()


class Controller:
    def __init__(self, state: ControllerState, notifier: Notifier | None = None) -> None:
        self.state = state
        config = state.config
        self.notifier = notifier or Notifier({})
        self.link = ControllerLink(config.broker, state.ingest.handle, state.mqtt_alerts,
                                   state.commands_out, password=config.broker_password())
        state.link_connected = lambda: self.link.connected
        state.ingest.link_up = lambda: self.link.connected
        state.ingest.link_connects = lambda: self.link.connects
        state.link_counters = lambda: {
            "connects": self.link.connects, "internal_errors": self.link.internal_errors,
            "alert_publish_failures": self.link.alert_publish_failures,
            "command_publish_failures": self.link.command_publish_failures,
            "commands_expired": self.link.commands_expired,
            "task_errors": self.task_errors}
        self.http_port: int | None = None
        self._gc = GcPolicy()
        self.task_errors = 0

    async def run(self, stop: asyncio.Event) -> None:
        config = self.state.config
        runner = web.AppRunner(build_app(self.state), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, config.http.host, config.http.port)
        await site.start()
        self.http_port = runner.addresses[0][1]
        if not self.state.public_url:
            bound = config.http.host
            reachable = socket.getfqdn() if bound in ("", "0.0.0.0", "::") else bound
            self.state.public_url = f"http://{reachable}:{self.http_port}"
        log.info("controller_started", http=f"http://{config.http.host}:{self.http_port}",
                 broker=f"{config.broker.host}:{config.broker.port}",
                 state_dir=str(config.state_dir))
        self.notifier.ready()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(stop))
                tg.create_task(self._every(stop, SWEEP_INTERVAL_S, self._sweep))
                if self.state.analytics is not None:
                    tg.create_task(self._scoring(stop, config.detection.batch_interval_s))
                tg.create_task(self._checkpoints(stop, config.state.checkpoint_interval_s))
                tg.create_task(self._every(stop, config.autoscale.interval_s,
                                           self._autoscale))
                tg.create_task(self._every(stop, GC_FREEZE_INTERVAL_S, self._gc.tick))
                tg.create_task(self._every(stop, PRUNE_INTERVAL_S, self._prune))
                tg.create_task(self.state.deployments.run(stop))
                senders = [tg.create_task(w.run()) for w in self.state.webhooks]
                await stop.wait()
                for task in senders:
                    task.cancel()
        finally:
            self.notifier.stopping()
            self.score()
            self.state.checkpoint()
            await runner.cleanup()
            self.state.store.close()
            self.state.registry.close()
            self.state.deployments.store.close()
            self.state.autoscaler.store.close()
            self.state.tokens.close()
            log.info("controller_stopped")

    def _prune(self) -> None:
        days = self.state.config.state.retention_days
        before = time.time() - days * 86_400
        removed = self.state.store.prune(before)
        self.state.deployments.store.prune_events(before)
        removed += self.state.autoscaler.store.prune(before)
        removed += self.state.tokens.prune(before)
        if removed:
            log.info("store_pruned", rows=removed, retention_days=days)

    def _autoscale(self) -> None:
        self.state.autoscaler.tick()

    def _sweep(self) -> None:
        self.state.ingest.sweep()
        self.notifier.watchdog()

    def score(self, limit: int | None = None) -> None:
        """Score up to ``limit`` buffered samples (all without one), record and alert."""
        analytics = self.state.analytics
        if analytics is None:
            return
        detections, holds = analytics.flush(limit)
        if detections:
            self.state.record(detections)
        for condition, at, until in holds:
            self.state.alerts.hold(condition, until, at)
        self.state.alerts.commit()

    async def _checkpoints(self, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
            if not stop.is_set():
                try:
                    await self.state.checkpoint_in_background()
                except OSError as exc:  # a full disk: keep running, say so, try next time
                    self.task_errors += 1
                    log.error("checkpoint_failed", path=str(self.state.config.state_dir),
                              error=str(exc))

    async def _scoring(self, stop: asyncio.Event, interval: float) -> None:
        """Every ``interval``, score what arrived since, in steps of SCORE_STEP samples with
        the loop let go between them: at 2,000 hosts a whole second's batch takes 0.1-0.3 s,
        which every API request and incoming message otherwise waited out."""
        analytics = self.state.analytics
        assert analytics is not None
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
            for _ in range(-(-analytics.pending // SCORE_STEP)):  # what is here now
                try:
                    self.score(SCORE_STEP)
                except Exception:  # that step's samples are lost, counted and logged
                    self.task_errors += 1
                    log.exception("periodic_task_failed", task="score")
                await asyncio.sleep(0)

    async def _every(self, stop: asyncio.Event, interval: float,
                     work: Callable[[], None]) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
            if not stop.is_set():
                try:
                    work()
                except Exception:
                    # A locked or full database, or a bug: one tick lost, logged and counted;
                    # the daemon and the next tick go on.
                    self.task_errors += 1
                    log.exception("periodic_task_failed", task=getattr(work, "__name__", "?"))
