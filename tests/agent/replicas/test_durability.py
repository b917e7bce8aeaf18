"""What must survive an agent restart: running replicas (however the agent exits), a stop
in progress (finished, never undone), and a process's identity across a clock step."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import msgspec
import psutil

from llm_ops_helper.agent.replicas import statefile
from llm_ops_helper.agent.replicas.process import Child, find_process, read_start_ticks
from llm_ops_helper.agent.replicas.statefile import load
from tests.agent.replicas.helpers import replica_processes, spec, wait_for

REPO = Path(__file__).resolve().parents[3]

# An agent that exits normally on SIGTERM: close() with stop_replicas_on_exit false. With
# Python 3.11 the pidfd child watcher (3.12's default) is asked for explicitly: under it an
# asyncio subprocess transport SIGKILLs a still-running child when it is closed.
GRACEFUL_AGENT = """
import asyncio, signal, sys
from pathlib import Path
from llm_ops_helper.agent.replicas.supervisor import Supervisor
from tests.agent.replicas.helpers import RUNTIMES, spec, supervisor_config

async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sup = Supervisor(supervisor_config(Path(sys.argv[1])), host="gpu-test", runtimes=RUNTIMES)
    await sup.start()
    await sup.deploy(spec(sys.argv[2]))
    while sup.replicas[sys.argv[2]].state != "ready":
        await asyncio.sleep(0.05)
    print("READY", sup.replicas[sys.argv[2]].child.pid, flush=True)
    await stop.wait()
    await sup.close()

if sys.version_info < (3, 12) and hasattr(asyncio, "PidfdChildWatcher"):
    asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
asyncio.run(main())
"""


async def test_a_replica_outlives_an_agent_that_exits_normally_and_is_adopted(
        make_supervisor, state_dir: Path) -> None:
    name = "tiny-r1-grace1"
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", GRACEFUL_AGENT, str(state_dir), name, cwd=REPO,
        stdout=asyncio.subprocess.PIPE)
    assert agent.stdout is not None
    line = ""
    async with asyncio.timeout(30):  # a hang guard only
        while not line.startswith("READY"):
            line = (await agent.stdout.readline()).decode()
            assert line, "the agent exited before its replica was ready"
        pid = int(line.split()[1])
        agent.send_signal(signal.SIGTERM)
        await agent.stdout.read()
        assert await agent.wait() == 0
    assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, \
        "the agent's exit took the replica with it"
    sup = await make_supervisor()
    assert sup.replicas[name].child is not None
    assert sup.replicas[name].child.pid == pid
    await wait_for(lambda: sup.replicas[name].state == "ready", "adopted and ready")
    assert [p.pid for p in replica_processes(state_dir, name)] == [pid]


async def test_a_stop_in_progress_is_finished_by_the_next_agent_not_undone(
        make_supervisor, state_dir: Path) -> None:
    first = await make_supervisor(stop_grace_s=3600.0)
    s = spec("tiny-r1-stop01", "--ignore-sigterm")
    await first.deploy(s)
    await wait_for(lambda: first.replicas[s.name].state == "ready", "ready")
    await first.stop(s.name, drain=False, timeout_s=0)
    # SIGTERM is ignored: the stop waits out its grace period when the agent restarts.
    await wait_for(lambda: any(r.stopping for r in load(state_dir)), "stop intent on disk")
    await first.close()
    first.replicas.clear()  # closed: the fixture's clean-up is the second one's
    [pid] = [p.pid for p in replica_processes(state_dir, s.name)]

    second = await make_supervisor(stop_grace_s=0.2)
    await wait_for(lambda: second.replicas[s.name].state == "stopped", "stop finished")
    assert second.replicas[s.name].restarts == 0
    assert replica_processes(state_dir, s.name) == []
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    await second.saved()
    assert load(state_dir) == []


async def test_an_adopted_process_is_known_by_its_start_tick_not_the_wall_clock(
        make_supervisor, state_dir: Path) -> None:
    first = await make_supervisor()
    s = spec("tiny-r1-clock1")
    await first.deploy(s)
    await wait_for(lambda: first.replicas[s.name].state == "ready", "ready")
    await first.close()
    [record] = load(state_dir)
    assert record.pid is not None
    assert record.start_ticks == read_start_ticks(record.pid)
    # The clock was stepped by 100 s: psutil's create time of the same process moved too.
    stepped = msgspec.structs.replace(record, create_time=(record.create_time or 0) + 100.0)
    statefile.save(state_dir, [stepped])

    second = await make_supervisor()
    child = second.replicas[s.name].child
    assert child is not None and child.pid == record.pid, "adopted, not relaunched"
    await wait_for(lambda: second.replicas[s.name].state == "ready", "ready")
    assert child.alive()
    assert len(replica_processes(state_dir, s.name)) == 1


def test_a_process_is_not_the_replica_with_another_start_tick_or_marker() -> None:
    pid = os.getpid()
    ticks = read_start_ticks(pid)
    assert ticks is not None
    os.environ["LLMOPS_REPLICA"] = "r1"
    try:
        assert find_process(pid, replica="r1", start_ticks=ticks) is not None
        assert find_process(pid, replica="r1", start_ticks=ticks + 1) is None
        assert find_process(pid, replica="r1", start_ticks=ticks, boot="another-boot") is None
        # The marker is read from /proc/{pid}/environ, as the process started: set it there.
    finally:
        del os.environ["LLMOPS_REPLICA"]
    child = Child(pid=pid, pgid=os.getpgid(pid), replica="r1", start_ticks=ticks)
    assert child.alive()


async def test_a_process_carrying_another_replicas_marker_is_not_that_replica(
        tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)",
        env={**os.environ, "LLMOPS_REPLICA": "other"})
    try:
        await wait_for(lambda: "LLMOPS_REPLICA" in psutil.Process(proc.pid).environ(),
                       "exec done")
        ticks = read_start_ticks(proc.pid)
        assert find_process(proc.pid, replica="other", start_ticks=ticks) is not None
        assert find_process(proc.pid, replica="r1", start_ticks=ticks) is None
    finally:
        proc.kill()
        await proc.wait()
