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
import subprocess
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


def gpu_env(gpus: Sequence[int], inventory: Sequence[GpuInfo], *,
            uuids: bool = True) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a replica given GPU indices (NVML order).

    UUIDs when the inventory knows every GPU: CUDA's default order (fastest first) need not be
    NVML's (PCI bus order), and a UUID means the same GPU to both. Otherwise indices, with
    CUDA told to count in PCI bus order as NVML does. No GPUs: an empty list, so a CPU replica
    on a GPU host cannot take GPU 0 by default. ``uuids=False`` when the inventory is
    simulated: its UUIDs are made up, and a real CUDA given one would see no GPU at all.
    """
    by_index = {g.index: g.uuid for g in inventory} if uuids else {}
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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(tail)
    os.replace(tmp, path)


def cap_log(path: Path, max_bytes: int, keep: int = LOG_KEEP_BYTES) -> bool:
    """Cut a running replica's log back to its last ``keep`` bytes once it passes
    ``max_bytes``, in place (copy, truncate): the replica's descriptor is O_APPEND, so its next
    write lands at the new end. The few lines written during the cut may be lost."""
    try:
        size = path.stat().st_size
        if size <= max_bytes:
            return False
        with path.open("rb") as f:
            f.seek(size - keep)
            tail = f.read(keep)
        newline = tail.find(b"\n")
        tail = tail[newline + 1:] if 0 <= newline < len(tail) - 1 else tail
        os.truncate(path, 0)
        with path.open("ab") as f:  # appended, as the replica's own writes are
            f.write(f"{LOG_HEADER} log cut at {size} bytes (supervisor.log_max_bytes)\n".encode()
                    + tail)
    except OSError:
        return False
    return True


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


def boot_id() -> str:
    """This boot's id: start ticks count from boot, so they only identify a process within one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def read_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/{pid}/stat`` field 22).

    Unlike a wall-clock create time, it does not move when the clock is stepped (NTP), so an
    exact match says "the same process" however long the agent was away.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces and parentheses) start at field 3.
    rest = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(rest[22 - 3])
    except (IndexError, ValueError):
        return None


@dataclass(slots=True)
class Child:
    """A running replica: our own child (``popen``), or one adopted from an earlier agent run.

    Never an asyncio subprocess: its transport kills a still-running child when it is closed
    or collected (Python 3.12's pidfd child watcher does so on every agent exit), and a
    replica must outlive the agent. A plain ``Popen`` waited through a pidfd does not.
    """

    pid: int
    pgid: int
    replica: str
    start_ticks: int | None
    boot_id: str = ""
    # psutil's create time: identity for state files written before start ticks were kept.
    create_time: float | None = None
    popen: subprocess.Popen[bytes] | None = None

    async def wait(self) -> int | None:
        """The exit code; None for an adopted process (only its parent could read it)."""
        if self.popen is not None:
            return await _wait_child(self.popen)
        # Not our child: no SIGCHLD, no pidfd we could have opened before it was reparented.
        while self.find() is not None:  # noqa: ASYNC110
            await asyncio.sleep(ADOPTED_POLL_S)
        return None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return self.find() is not None

    def find(self) -> psutil.Process | None:
        return find_process(self.pid, replica=self.replica, start_ticks=self.start_ticks,
                            boot=self.boot_id, create_time=self.create_time)

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


async def _wait_child(popen: subprocess.Popen[bytes]) -> int:
    """Wait for our own child without blocking the loop or a thread: its pidfd becomes
    readable when it exits. Polling where pidfds are missing (Linux < 5.3)."""
    if (code := popen.poll()) is not None:
        return code
    try:
        fd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        while (code := popen.poll()) is None:  # noqa: ASYNC110
            await asyncio.sleep(ADOPTED_POLL_S)
        return code
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return popen.wait()  # it has exited: this only reaps it


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


async def spawn(argv: Sequence[str], env: Mapping[str, str], log_path: Path, *,
                cwd: Path, header: str, replica: str) -> Child:
    """Start ``argv`` in a new session (its own process group), output appended to the log."""
    await asyncio.to_thread(trim_log, log_path)
    fd = _open_log(log_path)
    try:
        os.write(fd, f"{LOG_HEADER} {header}\n".encode())
        popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=fd,
                                 stderr=subprocess.STDOUT, env=dict(env), cwd=cwd,
                                 start_new_session=True)
    finally:
        os.close(fd)
    ticks = read_start_ticks(popen.pid)
    try:
        create_time: float | None = psutil.Process(popen.pid).create_time()
    except psutil.Error:
        create_time = None
    return Child(pid=popen.pid, pgid=popen.pid, replica=replica, start_ticks=ticks,
                 boot_id=boot_id(), create_time=create_time, popen=popen)


def find_process(pid: int, *, replica: str, start_ticks: int | None, boot: str = "",
                 create_time: float | None = None) -> psutil.Process | None:
    """The live process ``pid`` if it is still the replica's: same boot, same start tick
    (or, for an old state file, the same create time), not carrying another replica's marker.
    """
    if boot and boot != boot_id():
        return None
    try:
        proc = psutil.Process(pid)
        if start_ticks is not None:
            if read_start_ticks(pid) != start_ticks:
                return None
        elif create_time is None or abs(proc.create_time() - create_time) > \
                CREATE_TIME_SLACK_S:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    # A missing marker is no proof: a process may overwrite its environment block (a
    # setproctitle() with a long title); a different replica's marker is.
    with contextlib.suppress(psutil.Error):
        if proc.environ().get(MARKER_REPLICA, replica) != replica:
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


def replica_processes(state_dir: Path, replica: str) -> list[psutil.Process]:
    """Live processes of one replica, including any that left its process group."""
    return [proc for proc, name in marked_processes(state_dir) if name == replica]


def kill_processes(procs: Sequence[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
