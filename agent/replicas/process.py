"""Replica processes: spawn in their own process group, wait, signal, adopt, find orphans.

Every replica (and everything it forks: vLLM's engine workers) carries two environment
markers, :data:`MARKER_REPLICA` and :data:`MARKER_STATE_DIR`. They let a restarted agent find
processes of its own that its state file does not account for, and kill them, without ever
touching a process it did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from llm_ops_helper.proto.messages import GpuInfo

MARKER_REPLICA = "LLMOPS_REPLICA"
MARKER_STATE_DIR = "LLMOPS_AGENT_STATE_DIR"
# A replica's log keeps about this much across restarts; older output is cut at each start.
LOG_KEEP_BYTES = 1 << 20
LOG_HEADER = "--- llmops-agent:"
# How often an adopted process (not our child: no exit notification) is polled.
ADOPTED_POLL_S = 0.5
# Create times are floats from /proc; the same process reads back equal to well within this.
CREATE_TIME_SLACK_S = 0.05


def gpu_env(gpus: Sequence[int], inventory: Sequence[GpuInfo]) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a replica given GPU indices (NVML order).

    UUIDs when the inventory knows every GPU: CUDA's default order (fastest first) need not be
    NVML's (PCI bus order), and a UUID means the same GPU to both. Otherwise indices, with
    CUDA told to count in PCI bus order as NVML does. No GPUs: an empty list, so a CPU replica
    on a GPU host cannot take GPU 0 by default.
    """
    by_index = {g.index: g.uuid for g in inventory}
    if not gpus:
        return {"CUDA_VISIBLE_DEVICES": ""}
    if all(by_index.get(i, "").startswith(("GPU-", "MIG-")) for i in gpus):
        return {"CUDA_VISIBLE_DEVICES": ",".join(by_index[i] for i in gpus)}
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def trim_log(path: Path, keep: int = LOG_KEEP_BYTES) -> None:
    """Cut the log to about its last ``keep`` bytes, at a line boundary."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size <= keep:
        return
    with path.open("rb") as f:
        f.seek(size - keep)
        tail = f.read()
    newline = tail.find(b"\n")
    tail = tail[newline + 1:] if 0 <= newline < len(tail) - 1 else tail
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(tail)
    os.replace(tmp, path)


def last_log_line(path: Path, limit: int = 300) -> str:
    """The last line the replica wrote (not our own headers), for a failure reason."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    for line in reversed(tail.splitlines()):
        line = line.strip()
        if line and not line.startswith(LOG_HEADER):
            return line[:limit]
    return ""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit code unknown (adopted process)"
    if code < 0:
        try:
            return f"exit code {code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


@dataclass(slots=True)
class Child:
    """A running replica: our own child (``proc``), or one adopted from an earlier agent run."""

    pid: int
    pgid: int
    create_time: float
    proc: asyncio.subprocess.Process | None = None

    async def wait(self) -> int | None:
        """The exit code; None for an adopted process (only its parent could read it)."""
        if self.proc is not None:
            return await self.proc.wait()
        # Not our child: no SIGCHLD, no pidfd we could have opened before it was reparented.
        while find_process(self.pid, self.create_time) is not None:  # noqa: ASYNC110
            await asyncio.sleep(ADOPTED_POLL_S)
        return None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return find_process(self.pid, self.create_time) is not None

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signum)

    async def terminate(self, grace_s: float) -> int | None:
        """SIGTERM to the whole group; SIGKILL once ``grace_s`` has passed. The exit code."""
        self.signal_group(signal.SIGTERM)
        waiter = asyncio.ensure_future(self.wait())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=grace_s)
            if not done:
                self.signal_group(signal.SIGKILL)
                await waiter
        finally:
            waiter.cancel()
        # The leader is gone; whatever it forked and left behind goes with it.
        self.signal_group(signal.SIGKILL)
        return waiter.result() if waiter.done() and not waiter.cancelled() else None


async def spawn(argv: Sequence[str], env: Mapping[str, str], log_path: Path, *,
                cwd: Path, header: str) -> Child:
    """Start ``argv`` in a new session (its own process group), output appended to the log."""
    await asyncio.to_thread(trim_log, log_path)
    with log_path.open("ab") as log:
        log.write(f"{LOG_HEADER} {header}\n".encode())
        log.flush()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
            env=dict(env), cwd=cwd, start_new_session=True)
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.Error:  # gone already: exited at once; wait() reads its code
        create_time = time.time()
    return Child(pid=proc.pid, pgid=proc.pid, create_time=create_time, proc=proc)


def find_process(pid: int, create_time: float) -> psutil.Process | None:
    """The live process ``pid`` if it is the one created at ``create_time``; else None."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > CREATE_TIME_SLACK_S:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return proc


def marked_processes(state_dir: Path) -> list[tuple[psutil.Process, str]]:
    """Every live process carrying this state dir's marker, with its replica's name."""
    found: list[tuple[psutil.Process, str]] = []
    mine = str(state_dir)
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if env.get(MARKER_STATE_DIR) == mine and proc.status() != psutil.STATUS_ZOMBIE:
                found.append((proc, env.get(MARKER_REPLICA, "")))
        except psutil.Error:
            continue
    return found


def kill_processes(procs: Sequence[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
