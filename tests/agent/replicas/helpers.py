"""A test-only runtime that launches testserver.py, and the supervisor set-up the tests share."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from llm_ops_helper.agent.config import SupervisorConfig
from llm_ops_helper.agent.replicas.process import MARKER_REPLICA, MARKER_STATE_DIR
from llm_ops_helper.agent.runtimes.base import LaunchPlan
from llm_ops_helper.proto.messages import ReplicaSpec

SERVER = Path(__file__).with_name("testserver.py")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ServerRuntime:
    """Runs testserver.py: /health and vLLM-named /metrics."""

    name: str = "test"
    needs_artifact: bool = False

    def unavailable(self) -> str | None:
        return None

    def plan(self, spec: ReplicaSpec, *, model_path: Path | None, host: str,
             port: int) -> LaunchPlan:
        argv = [sys.executable, str(SERVER), "--host", host, "--port", str(port)]
        if model_path is not None:
            argv += ["--model", str(model_path)]
        base = f"http://127.0.0.1:{port}"
        return LaunchPlan(argv=[*argv, *spec.args], env=dict(spec.env),
                          health_url=f"{base}/health", metrics_url=f"{base}/metrics",
                          metrics_format="vllm", base_url=base)


RUNTIMES: dict[str, Any] = {"test": ServerRuntime()}


def supervisor_config(state_dir: Path, **overrides: Any) -> SupervisorConfig:
    low = random.randrange(21000, 29000, 100)
    values: dict[str, Any] = {
        "state_dir": str(state_dir), "bind_host": "127.0.0.1", "advertise_host": "127.0.0.1",
        "port_range": (low, low + 99), "stop_grace_s": 2.0, "restart_backoff_min_s": 0.05,
        "restart_backoff_max_s": 0.2, "liveness_interval_s": 0.2, "liveness_failures": 2,
        "drain_delay_s": 0.3,
    }
    values.update(overrides)
    return SupervisorConfig(**values)


def spec(name: str = "tiny-r1-abc123", *args: str, **fields: Any) -> ReplicaSpec:
    values: dict[str, Any] = {"deployment": "tiny", "version": "tiny@1", "runtime": "test",
                              "ready_timeout_s": 20.0, "crash_loop_restarts": 2,
                              "crash_loop_window_s": 60.0}
    values.update(fields)
    return ReplicaSpec(name=name, args=list(args), **values)


async def wait_for(predicate: Callable[[], T], what: str, timeout_s: float = 20.0) -> T:
    """Poll until ``predicate()`` is truthy. The timeout only guards against a hang."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not (result := predicate()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)
    return result


def replica_processes(state_dir: Path, name: str | None = None) -> list[psutil.Process]:
    """Live (not zombie) processes carrying this state dir's marker (and replica name)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
            if (env.get(MARKER_STATE_DIR) == str(state_dir)
                    and (name is None or env.get(MARKER_REPLICA) == name)
                    and proc.status() != psutil.STATUS_ZOMBIE):
                found.append(proc)
    return found


def kill_all(state_dir: Path) -> None:
    for proc in replica_processes(state_dir):
        with contextlib.suppress(psutil.Error):
            proc.kill()
