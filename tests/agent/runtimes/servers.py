"""Real server processes for the runtime tests: a free port, start, wait until healthy, stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from llm_ops_helper.agent.runtimes.base import LaunchPlan

# Generous caps for "never happened", not timing assertions.
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Child:
    plan: LaunchPlan
    proc: asyncio.subprocess.Process
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_exit(self, timeout_s: float = START_TIMEOUT_S) -> int:
        async with asyncio.timeout(timeout_s):
            return await self.proc.wait()

    async def wait_healthy(self, session: aiohttp.ClientSession) -> float:
        """Seconds from now until GET health_url answers 200; fails if the process exits."""
        start = time.monotonic()
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"exited {self.proc.returncode}:\n{self.log_text()}")
                try:
                    async with session.get(self.plan.health_url) as resp:
                        if resp.status == 200:
                            return time.monotonic() - start
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.02)

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await self.wait_exit(15)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


@asynccontextmanager
async def child(plan: LaunchPlan, log: Path) -> AsyncIterator[Child]:
    """The plan's argv as a child process (stdout and stderr to ``log``), stopped on exit."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *plan.argv, env={**os.environ, **plan.env}, stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT)
    running = Child(plan, proc, log)
    try:
        yield running
    finally:
        await running.stop()
