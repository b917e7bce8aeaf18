"""A restarted agent adopts its replicas from the state file: no duplicates, no orphans."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from structlog.testing import capture_logs

from llm_ops_helper.agent.replicas.process import MARKER_REPLICA, MARKER_STATE_DIR
from llm_ops_helper.agent.replicas.statefile import load, save
from tests.agent.replicas.helpers import replica_processes, spec, wait_for

REPO = Path(__file__).resolve().parents[3]

# The first agent: a Supervisor in its own process, which the test SIGKILLs once ready.
FIRST_AGENT = """
import asyncio, sys
from pathlib import Path
from llm_ops_helper.agent.replicas.statefile import load
from llm_ops_helper.agent.replicas.supervisor import Supervisor
from tests.agent.replicas.helpers import RUNTIMES, spec, supervisor_config

async def main():
    sup = Supervisor(supervisor_config(Path(sys.argv[1])), host="gpu-test", runtimes=RUNTIMES)
    await sup.start()
    await sup.deploy(spec(sys.argv[2]))
    # Ready, and written so (the state file is written off the loop, a moment later).
    while not any(r.spec.name == sys.argv[2] and r.state == "ready"
                  for r in load(Path(sys.argv[1]))):
        await asyncio.sleep(0.05)
    print("READY", sup.replicas[sys.argv[2]].child.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def run_first_agent_and_sigkill_it(state_dir: Path, name: str) -> int:
    """The replica's pid, left running by an agent that died without any clean-up."""
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FIRST_AGENT, str(state_dir), name, cwd=REPO,
        stdout=asyncio.subprocess.PIPE)
    assert agent.stdout is not None
    line = ""
    try:
        async with asyncio.timeout(30):
            while not line.startswith("READY"):  # after its log lines
                line = (await agent.stdout.readline()).decode()
                assert line, "the first agent exited before its replica was ready"
    finally:
        agent.kill()
        await agent.wait()
    return int(line.split()[1])


async def test_restarted_agent_adopts_the_live_replica_without_a_second_process(
        make_supervisor, state_dir: Path) -> None:
    name = "tiny-r1-adopt1"
    pid = await run_first_agent_and_sigkill_it(state_dir, name)
    assert [p.pid for p in replica_processes(state_dir, name)] == [pid]
    with capture_logs() as logs:
        sup = await make_supervisor()
    replica = sup.replicas[name]
    assert (replica.state, replica.child.pid, replica.restarts) == ("ready", pid, 0)
    assert any(e["event"] == "replica_adopted" and e["pid"] == pid for e in logs)
    assert not any(e["event"] == "replica_orphan_killed" for e in logs)
    # Still exactly one server for this replica, and it keeps answering its probes.
    await asyncio.sleep(3 * sup.config.liveness_interval_s)
    assert [p.pid for p in replica_processes(state_dir, name)] == [pid]
    assert replica.state == "ready" and replica.child.pid == pid
    # An adopted process is not our child: its exit is seen by polling, and it is restarted.
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: replica.restarts == 1 and replica.state == "ready", "restarted")
    assert replica.child.pid != pid
    assert len(replica_processes(state_dir, name)) == 1


async def test_a_replica_that_died_with_the_agent_is_restarted_from_its_spec(
        make_supervisor, state_dir: Path) -> None:
    name = "tiny-r1-adopt2"
    pid = await run_first_agent_and_sigkill_it(state_dir, name)
    os.killpg(pid, signal.SIGKILL)
    await wait_for(lambda: not replica_processes(state_dir, name), "replica gone")
    with capture_logs() as logs:
        sup = await make_supervisor()
    assert any(e["event"] == "replica_lost" and e["pid"] == pid for e in logs)
    replica = await wait_for(lambda: sup.replicas[name].state == "ready" and sup.replicas[name],
                             "ready again")
    assert replica.restarts == 1 and replica.child.pid != pid
    assert replica.spec == spec(name)
    await sup.saved()
    [record] = load(state_dir)
    assert record.pid == replica.child.pid


async def test_processes_of_this_state_dir_that_no_record_explains_are_killed(
        make_supervisor, state_dir: Path) -> None:
    os.makedirs(state_dir)
    env = {**os.environ, MARKER_STATE_DIR: str(state_dir), MARKER_REPLICA: "ghost-r1-000000"}
    ghost = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env,
                             start_new_session=True)
    # Same marker name, another state dir: another agent's, never touched.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**env, MARKER_STATE_DIR: str(state_dir) + "-other"})
    try:
        with capture_logs() as logs:
            await make_supervisor()
        assert ghost.wait(timeout=10) == -signal.SIGKILL
        assert any(e["event"] == "replica_orphan_killed" and e["pid"] == ghost.pid
                   for e in logs)
        assert other.poll() is None
    finally:
        ghost.kill()
        other.kill()
        ghost.wait()
        other.wait()


async def test_stop_replicas_on_exit_stops_them_when_the_supervisor_closes(
        make_supervisor, state_dir: Path) -> None:
    sup = await make_supervisor(stop_replicas_on_exit=True)
    await sup.deploy(spec("tiny-r1-exit00"))
    replica = await wait_for(lambda: sup.replicas["tiny-r1-exit00"].state == "ready"
                             and sup.replicas["tiny-r1-exit00"], "ready")
    pid = replica.child.pid
    await sup.close()
    assert replica.state == "stopped"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert load(state_dir) == []


async def test_without_stop_replicas_on_exit_closing_leaves_them_running(
        make_supervisor, state_dir: Path) -> None:
    sup = await make_supervisor()
    await sup.deploy(spec("tiny-r1-keep00"))
    await wait_for(lambda: sup.replicas["tiny-r1-keep00"].state == "ready", "ready")
    pid = sup.replicas["tiny-r1-keep00"].child.pid
    await sup.close()
    assert [p.pid for p in replica_processes(state_dir)] == [pid]
    [record] = load(state_dir)
    assert (record.state, record.pid) == ("ready", pid)


async def test_a_process_started_after_the_last_state_write_is_left_running(
        make_supervisor, state_dir: Path) -> None:
    # The state file's last write is older than the process: a later write failed (disk
    # full), so the file cannot know it. Killing it could stop inference; it is left alone.
    os.makedirs(state_dir)
    save(state_dir, [])
    os.utime(state_dir / "replicas.json", (1, 1))
    env = {**os.environ, MARKER_STATE_DIR: str(state_dir), MARKER_REPLICA: "lost-r1-000000"}
    lost = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env,
                            start_new_session=True)
    try:
        with capture_logs() as logs:
            await make_supervisor()
        assert lost.poll() is None
        assert any(e["event"] == "replica_unknown_left_running" and e["pid"] == lost.pid
                   for e in logs)
    finally:
        lost.kill()
        lost.wait()
