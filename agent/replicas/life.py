"""One replica's life, from fetch to stopped or failed: the half of the supervisor that runs
processes (the other half, :mod:`supervisor`, keeps the table of replicas and answers commands).

Launch in a new process group, probe readiness until ``ready_timeout_s``, probe liveness while
ready, restart after an exit with exponential backoff until the spec's crash-loop limit; stop
with SIGTERM then SIGKILL, after a drain when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp
import structlog

from llm_ops_helper.agent.config import SupervisorConfig
from llm_ops_helper.agent.replicas.artifacts import ArtifactCache, ArtifactError
from llm_ops_helper.agent.replicas.policy import give_up_reason, recent_exits
from llm_ops_helper.agent.replicas.ports import NoFreePort, pick_port
from llm_ops_helper.agent.replicas.probes import InFlight, probe_health
from llm_ops_helper.agent.replicas.process import (
    LOG_KEEP_BYTES,
    MARKER_REPLICA,
    MARKER_STATE_DIR,
    cap_log,
    describe_exit,
    gpu_env,
    kill_processes,
    last_log_line,
    replica_processes,
    spawn,
)
from llm_ops_helper.agent.replicas.replica import (
    FIRST_PROBE_S,
    POLL_S,
    Replica,
    ReplicaFailed,
    advertised_url,
)
from llm_ops_helper.agent.runtimes.base import LaunchPlan, RuntimeError_
from llm_ops_helper.backoff import backoff_delay
from llm_ops_helper.proto.messages import GpuInfo, ReplicaState

log = structlog.get_logger("llmops.agent.replicas")


class ReplicaLife:
    """Mixed into :class:`~llm_ops_helper.agent.replicas.supervisor.Supervisor`."""

    config: SupervisorConfig
    replicas: dict[str, Replica]
    cache: ArtifactCache
    inventory: Callable[[], Sequence[GpuInfo]]
    state_dir: Path
    logs_dir: Path
    home_dir: Path
    advertise_host: str
    gpu_uuids: bool
    _session: aiohttp.ClientSession | None

    def _set(self, replica: Replica, state: ReplicaState, reason: str | None = None) -> None:
        raise NotImplementedError

    async def _persist(self) -> None:
        raise NotImplementedError

    async def _run(self, replica: Replica) -> None:
        try:
            artifact = replica.spec.artifact
            if artifact is not None and replica.child is None:
                if replica.model_path is None or not replica.model_path.exists():
                    self._set(replica, "fetching")
                replica.model_path = await self.cache.fetch(artifact)
            await self._supervise(replica)
        except ArtifactError as exc:
            self._set(replica, "failed", str(exc))
        except ReplicaFailed as exc:
            self._set(replica, "failed", exc.reason)
        except Exception as exc:
            log.exception("replica_internal_error", replica=replica.name)
            if replica.child is not None:  # failed means no process: do not leave one running
                await replica.child.terminate(self.config.stop_grace_s)
                replica.child = None
            self._set(replica, "failed", f"internal error: {type(exc).__name__}: {exc}")

    async def _supervise(self, replica: Replica) -> None:
        loop = asyncio.get_running_loop()
        spec, cfg = replica.spec, self.config
        while True:
            if replica.child is None:
                await self._launch(replica)
            ended = await self._watch(replica)
            if replica.stopper is not None:
                return  # being stopped: the stopper reports the end
            line = await asyncio.to_thread(last_log_line, self._log_path(replica))
            now = loop.time()
            replica.exits = recent_exits([*replica.exits, now], now, spec.crash_loop_window_s)
            reason = give_up_reason(exits_in_window=len(replica.exits),
                                    limit=spec.crash_loop_restarts,
                                    window_s=spec.crash_loop_window_s,
                                    ever_ready=replica.ever_ready, exit_text=ended,
                                    last_line=line)
            replica.child = None
            if reason is not None:
                self._set(replica, "failed", reason)
                return
            delay = backoff_delay(len(replica.exits) - 1, cfg.restart_backoff_min_s,
                                  cfg.restart_backoff_max_s)
            replica.restarts += 1
            log.warning("replica_restarting", replica=replica.name, after=ended, last_line=line,
                        restarts=replica.restarts, delay_s=round(delay, 2))
            self._set(replica, "starting", f"restarting in {delay:.1f} s after {ended}"
                                           + (f": {line}" if line else ""))
            await asyncio.sleep(delay)

    def _plan(self, replica: Replica, port: int) -> LaunchPlan:
        try:
            plan = replica.runtime.plan(replica.spec, model_path=replica.model_path,
                                        host=self.config.bind_host, port=port)
        except RuntimeError_ as exc:
            raise ReplicaFailed(str(exc)) from None
        replica.port, replica.plan = port, plan
        replica.url = advertised_url(self.advertise_host, port)
        return plan

    def _log_path(self, replica: Replica) -> Path:
        return self.logs_dir / f"{replica.name}.log"

    async def _free_port(self, replica: Replica) -> int:
        """A port for the replica; while none can be had (all taken, or no descriptors left),
        waits with backoff: ports free up as other replicas stop."""
        low, high = self.config.port_range
        attempt = 0
        while True:
            taken = {r.port for r in self.replicas.values()
                     if r is not replica and r.port is not None
                     and r.state not in ("stopped", "failed")}
            try:
                return pick_port(self.config.bind_host, low, high, taken, preferred=replica.port)
            except (NoFreePort, OSError) as exc:
                error = str(exc) if isinstance(exc, NoFreePort) else \
                    f"cannot probe ports: {exc.strerror or exc}"
            delay = backoff_delay(attempt, self.config.restart_backoff_min_s,
                                  self.config.restart_backoff_max_s)
            log.warning("replica_port_wait", replica=replica.name, error=error,
                        delay_s=round(delay, 2))
            self._set(replica, "starting", f"waiting for a port: {error}")
            await asyncio.sleep(delay)
            attempt += 1

    def _env(self, replica: Replica, plan: LaunchPlan) -> dict[str, str]:
        # The agent's unit hides /home and /tmp (ProtectHome, PrivateTmp): caches (Hugging
        # Face, Triton, torch) go under the state dir unless the agent or the spec says where.
        home = str(self.home_dir)
        cache = os.environ.get("XDG_CACHE_HOME") or f"{home}/.cache"
        defaults = {"HOME": home, "XDG_CACHE_HOME": cache,
                    "HF_HOME": os.environ.get("HF_HOME") or f"{cache}/huggingface"}
        return {**os.environ, **defaults, **plan.env,
                **gpu_env(replica.spec.gpus, self.inventory(), uuids=self.gpu_uuids),
                MARKER_REPLICA: replica.name, MARKER_STATE_DIR: str(self.state_dir)}

    async def _launch(self, replica: Replica) -> None:
        port = await self._free_port(replica)
        plan = self._plan(replica, port)
        env = self._env(replica, plan)
        header = (f"starting {replica.name} (restarts {replica.restarts}) at "
                  f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: "
                  f"{shlex.join(plan.argv)}")
        spawning = asyncio.ensure_future(spawn(plan.argv, env, self._log_path(replica),
                                               cwd=self.state_dir, header=header,
                                               replica=replica.name))
        try:
            replica.child = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # Stopped while starting: keep hold of the process, so the stopper can end it
            # (or the state file keeps it, to be adopted) instead of leaking it.
            with contextlib.suppress(OSError):
                replica.child = await spawning
            raise
        except OSError as exc:
            raise ReplicaFailed(f"cannot start {plan.argv[0]}: {exc.strerror or exc}") from None
        replica.started_at = time.time()
        # Not the argv or env (they may carry tokens): the replica's log (0600) has the argv.
        log.info("replica_started", replica=replica.name, pid=replica.child.pid, port=port,
                 program=plan.argv[0], cuda_visible_devices=env["CUDA_VISIBLE_DEVICES"])
        self._set(replica, "starting")

    async def _watch(self, replica: Replica) -> str:
        """Probe until the process ends (or is killed for failing its probes); what ended it."""
        assert replica.child is not None
        assert replica.plan is not None
        assert self._session is not None
        child, health = replica.child, replica.plan.health_url
        exited = asyncio.ensure_future(child.wait())
        try:
            if (replica.state not in ("ready", "draining")
                    and not await self._until_ready(replica, exited)):
                return describe_exit(exited.result())
            failures = 0
            while True:
                done, _ = await asyncio.wait({exited}, timeout=self.config.liveness_interval_s)
                if done:
                    return describe_exit(exited.result())
                await asyncio.to_thread(cap_log, self._log_path(replica),
                                        self.config.log_max_bytes,
                                        min(LOG_KEEP_BYTES, self.config.log_max_bytes // 2))
                if replica.stopper is not None:
                    continue  # draining or stopping: the stopper decides its end
                error = await probe_health(self._session, health)
                if error is None:
                    failures = 0
                    continue
                failures += 1
                log.warning("replica_probe_failed", replica=replica.name, failures=failures,
                            error=error)
                if failures >= self.config.liveness_failures:
                    await child.terminate(self.config.stop_grace_s)
                    return f"health probe failed {failures} times: {error}"
        finally:
            exited.cancel()

    async def _until_ready(self, replica: Replica, exited: asyncio.Future[int | None]) -> bool:
        """True once the health URL answers 200; False when the process exits first."""
        assert replica.child is not None
        assert replica.plan is not None
        assert self._session is not None
        loop = asyncio.get_running_loop()
        timeout = replica.spec.ready_timeout_s
        started = loop.time()
        deadline = started + timeout
        # Small servers are up in a tenth of a second: probe often at first, then every
        # POLL_S (a fixed 0.25 s was most of a tiny llama.cpp replica's time to ready).
        pause = FIRST_PROBE_S
        while True:
            error = await probe_health(self._session, replica.plan.health_url)
            if error is None:
                break
            if exited.done():
                return False
            if loop.time() >= deadline:
                await replica.child.terminate(self.config.stop_grace_s)
                replica.child = None
                raise ReplicaFailed(f"not ready after {timeout:g} s; last probe: {error}")
            done, _ = await asyncio.wait({exited}, timeout=min(pause, deadline - loop.time()))
            if done:
                return False
            pause = min(POLL_S, pause * 1.5)
        replica.ever_ready = True
        log.info("replica_ready", replica=replica.name, url=replica.url,
                 seconds=round(loop.time() - started, 2))
        self._set(replica, "ready")
        return True

    async def _stop(self, replica: Replica, drain: bool = True, timeout_s: float = 30.0,
                    reason: str = "stopped by command") -> None:
        try:
            await self._persist()  # the stop intent is on disk before any signal
            if (drain and not replica.drain_cut and replica.state == "draining"
                    and replica.child is not None):
                replica.drainer = asyncio.ensure_future(self._drain(replica, timeout_s))
                try:
                    await asyncio.wait({replica.drainer})  # ends early when cut short
                finally:
                    replica.drainer.cancel()
                    replica.drainer = None
            if replica.task is not None:
                replica.task.cancel()
                await asyncio.wait({replica.task})
            code = None
            if replica.child is not None:
                code = await replica.child.terminate(self.config.stop_grace_s)
            replica.child = None
            # Processes that left the group (setsid) still carry the replica's marker.
            left = await asyncio.to_thread(replica_processes, self.state_dir, replica.name)
            if left:
                log.warning("replica_leftovers_killed", replica=replica.name,
                            pids=[p.pid for p in left])
                await asyncio.to_thread(kill_processes, left)
            replica.stopped_at = time.monotonic()
            log.info("replica_stopped", replica=replica.name, exit=describe_exit(code))
            self._set(replica, "stopped", reason)
            await self._persist()
        except Exception as exc:  # a stop must always end, whatever went wrong
            log.exception("replica_internal_error", replica=replica.name)
            if replica.child is not None:
                replica.child.signal_group(signal.SIGKILL)
            replica.stopped_at = time.monotonic()
            self._set(replica, "stopped", f"stopped after an internal error: {exc}")

    async def _drain(self, replica: Replica, timeout_s: float) -> None:
        assert self._session is not None
        assert replica.plan is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline, earliest = started + timeout_s, started + self.config.drain_delay_s
        in_flight = InFlight(replica.plan.metrics_url, replica.plan.metrics_format)
        last: float | None = None
        while (now := loop.time()) < deadline:
            if replica.child is None or not replica.child.alive():
                return
            if now >= earliest:
                last = await in_flight.read(self._session)
                if last == 0:
                    log.info("replica_drained", replica=replica.name,
                             seconds=round(loop.time() - started, 2))
                    return
            await asyncio.sleep(min(POLL_S, max(0.0, deadline - loop.time())))
        log.warning("replica_drain_timeout", replica=replica.name, timeout_s=timeout_s,
                    in_flight=last)
