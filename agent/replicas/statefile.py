"""``{state_dir}/replicas.json``: what this agent runs, so its next run adopts it.

Written atomically (temp file, fsync, rename, fsync of the directory), so a power cut or a
SIGKILL leaves either the old or the new file, never half of one. One :class:`StateWriter`
task writes it, in a worker thread, coalescing changes that come faster than the disk.
Mode 0600: specs may carry tokens in their ``env``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import msgspec
import structlog

from llm_ops_helper.proto.messages import ReplicaSpec, ReplicaState

log = structlog.get_logger("llmops.agent.replicas")

STATE_FILE = "replicas.json"
# After a failed write (disk full), the next try; it also happens on any change.
RETRY_S = 5.0
VERSION = 1


class StateFileError(Exception):
    """The state file exists but cannot be read as one."""


class ReplicaRecord(msgspec.Struct, kw_only=True, frozen=True):
    spec: ReplicaSpec
    spec_hash: str
    state: ReplicaState
    reason: str | None = None
    port: int | None = None
    pid: int | None = None
    pgid: int | None = None
    # A pid alone may have been reused by the time the agent returns: its start in clock ticks
    # since boot (immune to clock steps) and the boot it belongs to identify the process.
    start_ticks: int | None = None
    boot_id: str = ""
    # psutil's create_time: the identity older agents recorded (before start_ticks).
    create_time: float | None = None
    restarts: int = 0
    started_at: float | None = None
    ever_ready: bool = False
    # A stop was asked for: the next agent run finishes it instead of adopting the replica.
    stopping: bool = False


class _File(msgspec.Struct, kw_only=True):
    v: int = VERSION
    replicas: list[ReplicaRecord] = []


def spec_hash(spec: ReplicaSpec) -> str:
    """First 16 hex of the sha256 of the spec's canonical JSON (sorted keys)."""
    canonical = msgspec.json.encode(msgspec.to_builtins(spec), order="sorted")
    return hashlib.sha256(canonical).hexdigest()[:16]


def load(state_dir: Path) -> list[ReplicaRecord]:
    path = state_dir / STATE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return msgspec.json.decode(data, type=_File).replicas
    except msgspec.DecodeError as exc:
        raise StateFileError(f"{path}: not a replica state file: {exc}") from None


def save(state_dir: Path, records: list[ReplicaRecord]) -> None:
    path = state_dir / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.tmp")
    data = msgspec.json.encode(_File(replicas=records))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateWriter:
    """The single writer of the state file. :meth:`changed` asks for a write (cheap, on the
    loop); :meth:`flush` waits until what was current when it was called is on disk."""

    def __init__(self, state_dir: Path, records: Callable[[], list[ReplicaRecord]]) -> None:
        self.state_dir = state_dir
        self.records = records
        self._wanted = 0  # generation asked for
        self._written = 0  # generation on disk
        self._tried = 0  # generation last tried (written or failed)
        self._wake = asyncio.Event()
        self._done = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.failing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def changed(self) -> None:
        self._wanted += 1
        self._wake.set()

    async def flush(self) -> bool:
        """Wait for the current state to be written; False when the write failed."""
        self.changed()
        target = self._wanted
        if self._task is None or self._task.done():
            await self._write_once()
        else:
            async with self._done:
                await self._done.wait_for(lambda: self._tried >= target)
        return self._written >= target

    async def close(self) -> None:
        """Stop the task and write the final state."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._written < self._wanted:
            await self._write_once()

    async def _loop(self) -> None:
        while True:
            if self._tried >= self._wanted:  # nothing new: wait for a change (or, after a
                self._wake.clear()           # failed write, for the time to retry it)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RETRY_S if self.failing else None):
                        await self._wake.wait()
            await self._write_once()

    async def _write_once(self) -> None:
        target, records = self._wanted, self.records()  # a snapshot, taken on the loop
        write = asyncio.ensure_future(asyncio.to_thread(save, self.state_dir, records))
        try:
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                await asyncio.wait({write})  # never two writes of the temp file at once
                raise
        except OSError as exc:
            if not self.failing:
                log.error("state_file_write_failed", path=str(self.state_dir / STATE_FILE),
                          error=exc.strerror or str(exc), retry_s=RETRY_S)
            self.failing = True
        else:
            if self.failing:
                log.info("state_file_written_again", path=str(self.state_dir / STATE_FILE))
            self.failing = False
            self._written = max(self._written, target)
        self._tried = max(self._tried, target)
        async with self._done:
            self._done.notify_all()
