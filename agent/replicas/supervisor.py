"""The replica supervisor: one asyncio task per replica, from deploy to stopped or failed.

A replica's life (proto.messages.ReplicaState): pending -> fetching (artifact) -> starting
(process up, readiness probe) -> ready (liveness probe) -> draining -> stopped; failed with a
reason from any of them. An exit restarts it with exponential backoff until the crash-loop
limit of its spec. Every transition is logged (``replica_state_changed``), sent as a
``replica_state`` event, and written to the state file, which the next agent run adopts from.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp
import msgspec
import structlog

from llm_ops_helper.agent.collectors.metric_map import mappings
from llm_ops_helper.agent.collectors.runtime import ScrapeTarget
from llm_ops_helper.agent.config import SupervisorConfig
from llm_ops_helper.agent.replicas import statefile
from llm_ops_helper.agent.replicas.artifacts import SHA256, ArtifactCache
from llm_ops_helper.agent.replicas.life import ReplicaLife
from llm_ops_helper.agent.replicas.process import Child, kill_processes, marked_processes
from llm_ops_helper.agent.replicas.replica import (
    FAILED_KEPT_S,
    NAME,
    SCRAPED_STATES,
    STOPPED_KEPT_S,
    USING_ARTIFACT,
    Replica,
    ReplicaFailed,
)
from llm_ops_helper.agent.runtimes.base import Runtime, RuntimeError_
from llm_ops_helper.proto.messages import Event, GpuInfo, ReplicaSample, ReplicaSpec, ReplicaState

log = structlog.get_logger("llmops.agent.replicas")


class SupervisorError(Exception):
    """The supervisor cannot start (state directory unusable, state file unreadable)."""


class DeployError(Exception):
    """A deploy refused at once: the message says why (becomes the command's error)."""


class Supervisor(ReplicaLife):
    def __init__(self, config: SupervisorConfig, *, host: str, runtimes: Mapping[str, Runtime],
                 inventory: Callable[[], Sequence[GpuInfo]] = list,
                 emit: Callable[[Event], None] = lambda event: None,
                 gpu_uuids: bool = True) -> None:
        self.config = config
        # Whether the inventory's UUIDs are real ones CUDA knows (NVML), not simulated ones.
        self.gpu_uuids = gpu_uuids
        self.host = host
        self.runtimes = runtimes
        self.inventory = inventory
        self.emit = emit
        self.state_dir = config.state_path
        self.logs_dir = self.state_dir / "logs"
        # HOME of the replicas (the agent's unit may hide /home and /tmp from them).
        self.home_dir = self.state_dir / "home"
        self.advertise_host = config.advertised_host
        self.cache = ArtifactCache(config.cache_path, config.cache_max_bytes, host=host,
                                   timeout_s=config.download_timeout_s,
                                   in_use=self.artifacts_in_use,
                                   emit=lambda event: self.emit(event))
        self.replicas: dict[str, Replica] = {}
        self._session: aiohttp.ClientSession | None = None
        self._records: list[statefile.ReplicaRecord] | None = None
        self._writer = statefile.StateWriter(self.state_dir, self._snapshot)

    # --- lifecycle of the supervisor itself ----------------------------------------------

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def prepare(self) -> None:
        """Create the state, log and cache directories and read the state file;
        :class:`SupervisorError` if any of it fails."""
        try:
            self.logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.home_dir.mkdir(mode=0o700, exist_ok=True)
            self.cache.open()
        except OSError as exc:
            raise SupervisorError(f"cannot create {exc.filename}: {exc.strerror} (keys "
                                  "'supervisor.state_dir', 'supervisor.cache_dir')") from None
        try:
            self._records = statefile.load(self.state_dir)
        except statefile.StateFileError as exc:
            # Starting with no records would kill every replica as an orphan: refuse instead.
            raise SupervisorError(f"{exc}; the replicas it lists would be killed as orphans: "
                                  "fix it, or move it aside to start afresh") from None

    async def start(self) -> None:
        """Create the directories, adopt what the state file lists, kill what it does not."""
        if self._records is None:
            self.prepare()
        records, self._records = self._records or [], None
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        for record in records:
            self._restore(record)
        await self._kill_orphans()
        self._writer.start()
        self._save()
        for replica in self.replicas.values():
            if replica.state == "draining" or replica.stopping:
                # The last run was stopping it: finish that.
                if replica.child is not None:
                    replica.task = asyncio.create_task(self._run(replica))
                replica.stopper = asyncio.create_task(self._stop(
                    replica, drain=False,
                    reason="stopped: a stop was in progress when the agent restarted"))
            elif replica.state not in ("failed", "stopped"):
                replica.task = asyncio.create_task(self._run(replica))

    async def close(self) -> None:
        """Stop watching. Replicas keep running (the next agent adopts them) unless
        ``stop_replicas_on_exit``."""
        if self.config.stop_replicas_on_exit:
            await self.stop_all()
        tasks = [t for r in self.replicas.values() for t in (r.task, r.stopper) if t]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._save()
        await self._writer.close()
        await self.cache.close()
        if self._session is not None:
            await self._session.close()
        log.info("supervisor_closed", replicas_left_running=sum(
            1 for r in self.replicas.values() if r.child is not None and r.child.alive()))

    async def stop_all(self) -> None:
        """Stop every replica at once (no drain: the agent is going away) and wait."""
        for replica in self.replicas.values():
            if replica.stopper is None and replica.state != "stopped":
                replica.stopping = True  # saved by the stop: a kill mid-way cannot undo it
                replica.stopper = asyncio.create_task(self._stop(
                    replica, drain=False, reason="stopped with the agent (stop_replicas_on_exit)"))
        await asyncio.gather(*(r.stopper for r in self.replicas.values() if r.stopper),
                             return_exceptions=True)

    def _restore(self, record: statefile.ReplicaRecord) -> None:
        spec = record.spec
        runtime = self.runtimes.get(spec.runtime)
        if runtime is None or record.state == "stopped":
            log.warning("replica_not_restored", replica=spec.name, runtime=spec.runtime,
                        state=record.state, reason="unknown runtime" if runtime is None
                        else "stopped")
            return
        replica = Replica(spec=spec, spec_hash=record.spec_hash, runtime=runtime,
                          state=record.state, reason=record.reason, port=record.port,
                          restarts=record.restarts, started_at=record.started_at,
                          ever_ready=record.ever_ready, stopping=record.stopping)
        self.replicas[spec.name] = replica
        if spec.artifact is not None:
            replica.model_path = self.cache.path_for(spec.artifact)
        if record.state == "failed":
            replica.stopped_at = time.monotonic()  # forgotten after FAILED_KEPT_S from now
            return
        child = None if record.pid is None else Child(
            pid=record.pid, pgid=record.pgid or record.pid, replica=spec.name,
            start_ticks=record.start_ticks, boot_id=record.boot_id,
            create_time=record.create_time)
        if child is not None and record.port is not None and child.find() is not None:
            replica.child = child
            try:
                self._plan(replica, record.port)
            except ReplicaFailed as exc:
                replica.state, replica.reason = "failed", exc.reason
                return
            if record.state not in ("ready", "draining"):
                replica.state = "starting"
            log.info("replica_adopted", replica=spec.name, pid=record.pid, state=replica.state,
                     port=record.port)
        else:
            stopping = record.state == "draining" or record.stopping
            log.warning("replica_lost", replica=spec.name, pid=record.pid, state=record.state,
                        action="stopping" if stopping else "restarting")
            if stopping:
                replica.state = "draining"
            else:
                replica.state, replica.reason = "pending", "the agent restarted and its process "\
                                                           "was gone"
                replica.restarts += 1 if record.pid is not None else 0
        self._announce(replica)

    async def _kill_orphans(self) -> None:
        """Kill processes of this state dir that no adopted replica accounts for; leave alone
        those started after the state file was last written (a write that failed, a full disk:
        the file cannot know them, and they may be serving)."""
        adopted = [r.child for r in self.replicas.values() if r.child is not None]
        try:
            written: float | None = (self.state_dir / statefile.STATE_FILE).stat().st_mtime
        except OSError:
            written = None  # no file (first run, or moved aside to start afresh)

        def scan() -> tuple[list[tuple[Any, str]], list[tuple[Any, str]]]:
            import psutil

            keep = {c.pid for c in adopted}
            for child in adopted:
                with contextlib.suppress(psutil.Error):
                    keep |= {p.pid for p in psutil.Process(child.pid).children(recursive=True)}
            pgids = {c.pgid for c in adopted}
            orphans, unknown = [], []
            for proc, name in marked_processes(self.state_dir):
                try:
                    pgid = os.getpgid(proc.pid)
                    created = proc.create_time()
                except (OSError, psutil.Error):
                    continue
                if proc.pid in keep or pgid in pgids:
                    continue
                if written is not None and created > written:
                    unknown.append((proc, name))
                else:
                    orphans.append((proc, name))
            return orphans, unknown

        orphans, unknown = await asyncio.to_thread(scan)
        for proc, name in unknown:
            log.error("replica_unknown_left_running", replica=name, pid=proc.pid,
                      reason="started after the state file was last written (a failed write?)",
                      action="not supervised: stop it by hand")
        for proc, name in orphans:
            log.warning("replica_orphan_killed", replica=name, pid=proc.pid)
        await asyncio.to_thread(kill_processes, [proc for proc, _ in orphans])

    # --- state ---------------------------------------------------------------------------

    def _snapshot(self) -> list[statefile.ReplicaRecord]:
        return [r.record() for r in self.replicas.values() if r.state != "stopped"]

    def _save(self) -> None:
        self._writer.changed()

    async def _persist(self) -> None:
        await self._writer.flush()

    async def saved(self) -> None:
        """Return once the state file holds every change made so far (it is written off the
        loop, coalesced, a moment after each change)."""
        await self._writer.flush()

    def _set(self, replica: Replica, state: ReplicaState, reason: str | None = None) -> None:
        changed = (state, reason) != (replica.state, replica.reason)
        replica.state, replica.reason = state, reason
        if state in ("failed", "stopped") and replica.stopped_at is None:
            replica.stopped_at = time.monotonic()
        self._save()
        if changed:
            self._announce(replica)

    def _announce(self, replica: Replica) -> None:
        data: dict[str, str | int | float | bool | None] = {
            "state": replica.state, "reason": replica.reason,
            "deployment": replica.spec.deployment, "version": replica.spec.version,
            "url": replica.url, "restarts": replica.restarts, "spec_hash": replica.spec_hash}
        log.info("replica_state_changed", replica=replica.name,
                 pid=replica.child.pid if replica.child else None, **data)
        message = f"replica {replica.name} {replica.state}"
        self.emit(Event(host=self.host, ts=time.time(), kind="replica_state",
                        severity="warning" if replica.state == "failed" else "info",
                        message=f"{message}: {replica.reason}" if replica.reason else message,
                        replica=replica.name, data=data))

    def _prune(self) -> None:
        now = time.monotonic()
        for name, replica in list(self.replicas.items()):
            if replica.state not in ("failed", "stopped") or replica.stopped_at is None:
                continue
            kept = FAILED_KEPT_S if replica.state == "failed" else STOPPED_KEPT_S
            if now - replica.stopped_at > kept:
                del self.replicas[name]
                if replica.state == "failed":
                    self._save()

    # --- commands ------------------------------------------------------------------------

    async def deploy(self, spec: ReplicaSpec) -> dict[str, Any]:
        """Accept a replica and start it in the background; :class:`DeployError` at once for
        what cannot work. The same name with the same spec again changes nothing."""
        digest = statefile.spec_hash(spec)
        existing = self.replicas.get(spec.name)
        if existing is not None and existing.state != "stopped":
            if existing.stopping:
                raise DeployError(f"replica {spec.name} is being stopped; a replica to run "
                                  "needs a new name (or the same one once it has stopped)")
            if existing.spec_hash != digest:
                raise DeployError(f"replica {spec.name} already runs a different spec "
                                  f"(spec_hash {existing.spec_hash}, this one {digest}); "
                                  "a new spec needs a new replica name")
            return {"state": existing.state, "url": existing.url, "spec_hash": digest,
                    "unchanged": True}
        runtime = self._check(spec)
        replica = Replica(spec=spec, spec_hash=digest, runtime=runtime)
        self.replicas[spec.name] = replica
        log.info("replica_accepted", replica=spec.name, deployment=spec.deployment,
                 version=spec.version, runtime=spec.runtime, gpus=spec.gpus, spec_hash=digest)
        self._save()
        self._announce(replica)
        replica.task = asyncio.create_task(self._run(replica))
        return {"state": replica.state, "url": replica.url, "spec_hash": digest}

    def _check(self, spec: ReplicaSpec) -> Runtime:
        if not NAME.fullmatch(spec.name):
            raise DeployError(f"replica name {spec.name!r} is not usable: expected [a-z0-9-], "
                              "at most 63 characters, not starting or ending with '-'")
        runtime = self.runtimes.get(spec.runtime)
        if runtime is None:
            raise DeployError(f"unknown runtime {spec.runtime!r}; this agent knows "
                              f"{', '.join(sorted(self.runtimes)) or 'none'}")
        why = runtime.unavailable()
        if why is not None:
            raise DeployError(f"runtime {spec.runtime!r} is not available on this host: {why}")
        # Checked again here (not only when a command is decoded): paths are built from it.
        if spec.artifact is not None and not SHA256.fullmatch(spec.artifact.sha256):
            raise DeployError(f"artifact sha256 {spec.artifact.sha256!r} is not 64 lowercase "
                              "hex digits")
        if spec.crash_loop_window_s <= 0 or spec.crash_loop_restarts < 0:
            raise DeployError("crash_loop_window_s must be > 0 and crash_loop_restarts >= 0")
        if len(set(spec.gpus)) != len(spec.gpus):
            raise DeployError(f"GPU indices repeat in {spec.gpus}")
        known = sorted(g.index for g in self.inventory())
        missing = [i for i in spec.gpus if i not in known]
        if missing:
            raise DeployError(f"GPU {', '.join(map(str, missing))} not on this host (it has "
                              f"{', '.join(map(str, known)) if known else 'no GPUs'})")
        if runtime.needs_artifact and spec.artifact is None:
            raise DeployError(f"runtime {spec.runtime!r} needs an artifact; the spec has none")
        model = self.cache.path_for(spec.artifact) if spec.artifact else None
        try:  # plans are pure: a spec they refuse is refused now, not after a download
            runtime.plan(spec, model_path=model, host=self.config.bind_host,
                         port=self.config.port_range[0])
        except RuntimeError_ as exc:
            raise DeployError(str(exc)) from None
        return runtime

    async def stop(self, name: str, *, drain: bool, timeout_s: float | None = None,
                   wait: bool = False) -> dict[str, Any]:
        """Stop (after draining, if asked) in the background; ``wait`` for it to finish.
        ``timeout_s`` (the drain's) defaults to the spec's ``drain_timeout_s``. A stop without
        drain cuts short a drain in progress."""
        replica = self.replicas.get(name)
        if replica is None or replica.state == "stopped":
            return {"state": "stopped", "note": "not running"}
        if timeout_s is None:
            timeout_s = replica.spec.drain_timeout_s
        if replica.stopper is None:
            log.info("replica_stopping", replica=name, drain=drain, timeout_s=timeout_s)
            # Kept in the state file (written before any signal): an agent restart in the
            # middle finishes the stop instead of adopting or restarting the replica.
            replica.stopping = True
            if drain and replica.state == "ready" and replica.child is not None:
                # At once, so the routing stops with this command's answer.
                self._set(replica, "draining", f"draining, at most {timeout_s:g} s")
            else:
                self._save()
            replica.stopper = asyncio.create_task(self._stop(replica, drain, timeout_s))
        elif not drain and not replica.drain_cut:
            log.info("replica_drain_cut_short", replica=name)
            replica.drain_cut = True
            if replica.drainer is not None:
                replica.drainer.cancel()
        if wait:
            await asyncio.shield(replica.stopper)
        return {"state": replica.state}

    def artifacts_in_use(self) -> dict[str, list[str]]:
        used: dict[str, list[str]] = {}
        for replica in self.replicas.values():
            if replica.spec.artifact is not None and replica.state in USING_ARTIFACT:
                used.setdefault(replica.spec.artifact.sha256, []).append(replica.name)
        return used

    # --- telemetry -----------------------------------------------------------------------

    def gpu_memory_in_use(self) -> dict[int, int]:
        """GPU memory per GPU index held by ready (and draining) replicas, from their specs:
        what simulated GPUs report as used. Replicas still starting are the controller's
        reservations, not yet in the reading (see the scheduler)."""
        used: dict[int, int] = {}
        for r in self.replicas.values():
            if r.state in ("ready", "draining") and r.spec.gpu_memory_bytes:
                for index in r.spec.gpus:
                    used[index] = used.get(index, 0) + r.spec.gpu_memory_bytes
        return used

    def targets(self) -> list[ScrapeTarget]:
        """Supervised replicas to scrape: those with a process and a known metrics format."""
        known = mappings()
        return [ScrapeTarget(r.name, r.plan.metrics_format, r.plan.metrics_url)
                for r in self.replicas.values()
                if r.state in SCRAPED_STATES and r.plan is not None and r.plan.metrics_url
                and r.plan.metrics_format in known]

    def merge(self, samples: Sequence[ReplicaSample]) -> list[ReplicaSample]:
        """Scraped samples with the supervisor's fields filled in for its replicas, and a
        sample (up=False) for each supervised replica that was not scraped."""
        self._prune()
        scraped = {s.name: s for s in samples}
        out = [s for s in samples if s.name not in self.replicas]
        for replica in self.replicas.values():
            base = scraped.get(replica.name) or ReplicaSample(
                name=replica.name, runtime=replica.spec.runtime, up=False)
            out.append(msgspec.structs.replace(
                base, runtime=replica.spec.runtime, state=replica.state, reason=replica.reason,
                deployment=replica.spec.deployment, version=replica.spec.version,
                url=replica.url, gpus=list(replica.spec.gpus), restarts=replica.restarts,
                spec_hash=replica.spec_hash,
                pid=replica.child.pid if replica.child is not None else None,
                started_at=replica.started_at))
        return out

    # --- one replica's life --------------------------------------------------------------
