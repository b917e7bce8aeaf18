from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from llm_ops_helper.agent.replicas.supervisor import Supervisor
from llm_ops_helper.proto.messages import Event, GpuInfo
from tests.agent.replicas.helpers import RUNTIMES, kill_all, supervisor_config

INVENTORY = [GpuInfo(index=i, uuid=f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd", name="A100")
             for i in range(2)]


@pytest.fixture
def state_dir(tmp_path: Path) -> Any:
    path = tmp_path / "state"
    yield path
    kill_all(path)  # whatever a failed test left behind


@pytest.fixture
async def make_supervisor(state_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Supervisor] = []

    async def make(events: list[Event] | None = None, **overrides: Any) -> Supervisor:
        sink = events if events is not None else []
        supervisor = Supervisor(supervisor_config(state_dir, **overrides), host="gpu-test",
                                runtimes=RUNTIMES, inventory=lambda: INVENTORY,
                                emit=sink.append)
        await supervisor.start()
        made.append(supervisor)
        return supervisor

    yield make
    for supervisor in made:
        for name in list(supervisor.replicas):
            await supervisor.stop(name, drain=False, timeout_s=0, wait=True)
        await supervisor.close()
