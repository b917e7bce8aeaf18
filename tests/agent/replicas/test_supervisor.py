"""The supervisor against real child processes (testserver.py): start, probe, restart, stop."""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from structlog.testing import capture_logs

from llm_ops_helper.agent.replicas import artifacts
from llm_ops_helper.agent.replicas.statefile import load, spec_hash
from llm_ops_helper.agent.replicas.supervisor import DeployError
from llm_ops_helper.proto.messages import ArtifactRef, Event, ReplicaSample
from tests.agent.replicas.helpers import ServerRuntime, replica_processes, spec, wait_for


def states(events: list[Event], name: str) -> list[str]:
    return [str(e.data["state"]) for e in events if e.kind == "replica_state"
            and e.replica == name]


async def test_deploy_starts_a_ready_replica_with_its_gpus_port_log_and_state_file(
        make_supervisor, state_dir: Path) -> None:
    events: list[Event] = []
    sup = await make_supervisor(events)
    s = spec("tiny-r1-aaaaaa", gpus=[1], env={"EXTRA": "1"})
    accepted = await sup.deploy(s)
    assert accepted["state"] == "pending" and accepted["spec_hash"] == spec_hash(s)
    replica = await wait_for(lambda: sup.replicas["tiny-r1-aaaaaa"].state == "ready"
                             and sup.replicas["tiny-r1-aaaaaa"], "ready")
    assert states(events, s.name) == ["pending", "starting", "ready"]
    ready = events[-1]
    assert ready.severity == "info" and ready.host == "gpu-test"
    assert ready.data == {"state": "ready", "reason": None, "deployment": "tiny",
                          "version": "tiny@1", "url": f"http://127.0.0.1:{replica.port}",
                          "restarts": 0, "spec_hash": spec_hash(s)}
    low, high = sup.config.port_range
    assert replica.port is not None and low <= replica.port <= high
    proc = psutil.Process(replica.child.pid)
    env = proc.environ()
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-00000001-aaaa-bbbb-cccc-dddddddddddd"
    assert env["EXTRA"] == "1"
    assert os.getpgid(proc.pid) == proc.pid, "the replica leads its own process group"
    assert "testserver pid" in (state_dir / "logs" / f"{s.name}.log").read_text()
    await sup.saved()
    [record] = load(state_dir)
    assert (record.spec, record.state, record.pid, record.port) == (
        s, "ready", proc.pid, replica.port)
    assert record.create_time == pytest.approx(proc.create_time())

    [target] = sup.targets()
    assert (target.name, target.runtime) == (s.name, "vllm")
    [sample] = sup.merge([ReplicaSample(name=s.name, runtime="vllm", up=True,
                                        metrics={"requests_running": 0.0})])
    assert (sample.runtime, sample.state, sample.up, sample.gpus, sample.pid) == (
        "test", "ready", True, [1], proc.pid)
    assert sample.url == f"http://127.0.0.1:{replica.port}" and sample.version == "tiny@1"


async def test_deploy_is_idempotent_and_refuses_a_different_spec_under_the_same_name(
        make_supervisor) -> None:
    events: list[Event] = []
    sup = await make_supervisor(events)
    s = spec("tiny-r1-bbbbbb")
    await sup.deploy(s)
    await wait_for(lambda: sup.replicas[s.name].state == "ready", "ready")
    pid = sup.replicas[s.name].child.pid
    again = await sup.deploy(s)
    assert again["unchanged"] and again["state"] == "ready"
    assert sup.replicas[s.name].child.pid == pid
    assert states(events, s.name) == ["pending", "starting", "ready"]
    with pytest.raises(DeployError, match="replica tiny-r1-bbbbbb already runs a different spec"):
        await sup.deploy(spec("tiny-r1-bbbbbb", "--start-delay", "0"))
    assert await sup.stop("nope-r1-000000", drain=False, timeout_s=1) == {
        "state": "stopped", "note": "not running"}


@pytest.mark.parametrize(("fields", "message"), [
    ({"runtime": "tensorrt"}, "unknown runtime 'tensorrt'; this agent knows test"),
    ({"gpus": [0, 5]}, "GPU 5 not on this host (it has 0, 1)"),
    ({"name": "Bad_Name"}, "replica name 'Bad_Name' is not usable"),
    ({"gpus": [1, 1]}, "GPU indices repeat in [1, 1]"),
    ({"crash_loop_window_s": 0.0}, "crash_loop_window_s must be > 0"),
    ({"artifact": ArtifactRef(sha256="../../x", size_bytes=1, url="http://h/a")},
     "artifact sha256 '../../x' is not 64 lowercase hex digits"),
])
async def test_deploy_refuses_at_once_what_cannot_work(make_supervisor, fields, message) -> None:
    sup = await make_supervisor()
    with pytest.raises(DeployError, match=re.escape(message)):
        await sup.deploy(spec(**fields) if "name" not in fields
                         else spec(fields["name"]))
    assert sup.replicas == {}


async def test_a_runtime_that_needs_an_artifact_is_refused_without_one(make_supervisor) -> None:
    sup = await make_supervisor()
    sup.runtimes = {"test": type(sup.runtimes["test"])(needs_artifact=True)}
    with pytest.raises(DeployError, match="runtime 'test' needs an artifact; the spec has none"):
        await sup.deploy(spec())


async def test_exit_at_start_restarts_then_fails_with_code_and_last_log_line(
        make_supervisor) -> None:
    events: list[Event] = []
    sup = await make_supervisor(events)
    s = spec("tiny-r1-cccccc", "--exit-at-start", "7")
    await sup.deploy(s)
    replica = await wait_for(lambda: sup.replicas[s.name].state == "failed"
                             and sup.replicas[s.name], "failed")
    assert replica.reason == "exited at start with code 7: fatal: cannot load model"
    assert replica.restarts == 2, "crash_loop_restarts = 2 restarts, then failed"
    assert events[-1].severity == "warning" and events[-1].data["state"] == "failed"
    # A failed replica stays failed: the same deploy again changes nothing.
    assert (await sup.deploy(s))["state"] == "failed"
    assert replica_processes(sup.state_dir, s.name) == []


async def test_crash_loop_after_ready_fails_with_the_count_and_last_line(make_supervisor) -> None:
    events: list[Event] = []
    sup = await make_supervisor(events)
    s = spec("tiny-r1-dddddd", "--crash-after", "0.3")
    await sup.deploy(s)
    replica = await wait_for(lambda: sup.replicas[s.name].state == "failed"
                             and sup.replicas[s.name], "failed")
    assert replica.reason == ("crash loop: exited 3 times in 60 s; last: exit code 3: "
                              "boom: segfault in the fake engine")
    seen = states(events, s.name)
    assert seen.count("ready") == 3 and seen[-1] == "failed"


async def test_ready_timeout_fails_and_kills_the_process(make_supervisor) -> None:
    sup = await make_supervisor()
    s = spec("tiny-r1-eeeeee", "--start-delay", "60", ready_timeout_s=0.5)
    await sup.deploy(s)
    replica = await wait_for(lambda: sup.replicas[s.name].state == "failed"
                             and sup.replicas[s.name], "failed")
    assert replica.reason is not None
    assert replica.reason.startswith("not ready after 0.5 s; last probe: connection refused")
    assert replica_processes(sup.state_dir, s.name) == []


async def test_failing_liveness_probes_kill_and_restart_the_replica(
        make_supervisor, tmp_path: Path) -> None:
    events: list[Event] = []
    sup = await make_supervisor(events)
    s = spec("tiny-r1-ffffff", "--control", str(tmp_path))
    await sup.deploy(s)
    await wait_for(lambda: sup.replicas[s.name].state == "ready", "ready")
    first = sup.replicas[s.name].child.pid
    (tmp_path / "unhealthy").write_text(str(first))
    await wait_for(lambda: sup.replicas[s.name].restarts == 1
                   and sup.replicas[s.name].state == "ready", "restarted and ready")
    assert sup.replicas[s.name].child.pid != first
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
    reasons = [e.data["reason"] for e in events if e.data.get("state") == "starting"
               and e.data["reason"]]
    assert any("after health probe failed 2 times: HTTP 503 from http://127.0.0.1:" in str(r)
               for r in reasons), reasons


@pytest.mark.parametrize(("flags", "signal_name"), [((), "SIGTERM"),
                                                    (("--ignore-sigterm",), "SIGKILL")])
async def test_stop_sends_sigterm_to_the_group_and_sigkill_after_the_grace(
        make_supervisor, flags, signal_name) -> None:
    events: list[Event] = []
    sup = await make_supervisor(events, stop_grace_s=0.5)
    s = spec("tiny-r1-gggggg", *flags)
    await sup.deploy(s)
    await wait_for(lambda: sup.replicas[s.name].state == "ready", "ready")
    with capture_logs() as logs:
        await sup.stop(s.name, drain=False, timeout_s=5, wait=True)
    [stopped] = [e for e in logs if e["event"] == "replica_stopped"]
    assert signal_name in stopped["exit"]
    assert states(events, s.name)[-1] == "stopped"
    assert replica_processes(sup.state_dir, s.name) == []
    assert load(sup.state_dir) == [], "a stopped replica leaves the state file"
    assert (await sup.stop(s.name, drain=True, timeout_s=1))["state"] == "stopped"
    [sample] = sup.merge([])
    assert (sample.state, sample.up) == ("stopped", False), "reported a while after stopping"


async def test_drain_waits_for_requests_in_flight(make_supervisor, tmp_path: Path) -> None:
    events: list[Event] = []
    sup = await make_supervisor(events)
    s = spec("tiny-r1-hhhhhh", "--control", str(tmp_path))
    (tmp_path / "running").write_text("2")
    await sup.deploy(s)
    await wait_for(lambda: sup.replicas[s.name].state == "ready", "ready")
    assert (await sup.stop(s.name, drain=True, timeout_s=30))["state"] == "draining"
    assert sup.targets(), "a draining replica is still scraped"
    # Well past drain_delay_s (0.3 s): still draining, because 2 requests are in flight.
    await asyncio.sleep(1.0)
    assert sup.replicas[s.name].state == "draining"
    assert len(replica_processes(sup.state_dir, s.name)) == 1
    (tmp_path / "running").write_text("0")
    await wait_for(lambda: sup.replicas[s.name].state == "stopped", "stopped")
    assert states(events, s.name)[-2:] == ["draining", "stopped"]
    assert replica_processes(sup.state_dir, s.name) == []


async def test_drain_timeout_stops_anyway(make_supervisor, tmp_path: Path) -> None:
    sup = await make_supervisor()
    s = spec("tiny-r1-iiiiii", "--control", str(tmp_path))
    (tmp_path / "running").write_text("5")
    await sup.deploy(s)
    await wait_for(lambda: sup.replicas[s.name].state == "ready", "ready")
    with capture_logs() as logs:
        await sup.stop(s.name, drain=True, timeout_s=1.5, wait=True)
    assert sup.replicas[s.name].state == "stopped"
    assert any(e["event"] == "replica_drain_timeout" and e["in_flight"] == 5 for e in logs), logs


async def test_a_failed_fetch_fails_the_replica_with_the_reason(make_supervisor,
                                                                monkeypatch) -> None:
    monkeypatch.setattr(artifacts, "CONNECT_WINDOW_S", 0.0)  # three quick tries, then give up
    sup = await make_supervisor()
    ref = ArtifactRef(sha256="0" * 64, size_bytes=10, url="http://127.0.0.1:1/nothing")
    s = spec("tiny-r1-jjjjjj", artifact=ref)
    await sup.deploy(s)
    replica = await wait_for(lambda: sup.replicas[s.name].state == "failed"
                             and sup.replicas[s.name], "failed")
    assert replica.reason is not None and "failed 3 times" in replica.reason


async def test_a_server_binary_that_is_missing_fails_the_replica_at_once(make_supervisor) -> None:
    class Missing(ServerRuntime):
        def plan(self, spec, *, model_path, host, port):  # type: ignore[no-untyped-def]
            return replace(super().plan(spec, model_path=model_path, host=host, port=port),
                           argv=["/nonexistent/llama-server"])

    sup = await make_supervisor()
    sup.runtimes = {"test": Missing()}
    await sup.deploy(spec("tiny-r1-kkkkkk"))
    replica = await wait_for(lambda: sup.replicas["tiny-r1-kkkkkk"].state == "failed"
                             and sup.replicas["tiny-r1-kkkkkk"], "failed")
    assert replica.reason == ("cannot start /nonexistent/llama-server: No such file or "
                              "directory")


async def test_a_deploy_while_draining_is_refused_and_a_stop_without_drain_cuts_it_short(
        make_supervisor, tmp_path: Path) -> None:
    sup = await make_supervisor()
    s = spec("tiny-r1-cutcut", "--control", str(tmp_path))
    (tmp_path / "running").write_text("2")  # never drains by itself
    await sup.deploy(s)
    await wait_for(lambda: sup.replicas[s.name].state == "ready", "ready")
    assert (await sup.stop(s.name, drain=True, timeout_s=3600))["state"] == "draining"
    with pytest.raises(DeployError, match="being stopped"):
        await sup.deploy(s)
    async with asyncio.timeout(30):  # a hang guard: the drain itself would take an hour
        await sup.stop(s.name, drain=False, timeout_s=0, wait=True)
    assert sup.replicas[s.name].state == "stopped"
    assert replica_processes(sup.state_dir, s.name) == []


async def test_a_process_that_left_the_group_is_killed_with_its_replica(make_supervisor) -> None:
    sup = await make_supervisor()
    s = spec("tiny-r1-escape", "--spawn-escapee")
    await sup.deploy(s)
    await wait_for(lambda: sup.replicas[s.name].state == "ready", "ready")
    await wait_for(lambda: len(replica_processes(sup.state_dir, s.name)) == 2, "escapee up")
    await sup.stop(s.name, drain=False, timeout_s=0, wait=True)
    assert replica_processes(sup.state_dir, s.name) == []


async def test_replicas_get_a_home_and_caches_under_the_state_dir(
        make_supervisor, state_dir: Path) -> None:
    sup = await make_supervisor()
    await sup.deploy(spec("tiny-r1-home01"))
    await sup.deploy(spec("tiny-r1-home02", env={"HF_HOME": "/models/hf"}))
    for name in ("tiny-r1-home01", "tiny-r1-home02"):
        await wait_for(lambda n=name: sup.replicas[n].state == "ready", "ready")
    env1 = psutil.Process(sup.replicas["tiny-r1-home01"].child.pid).environ()
    env2 = psutil.Process(sup.replicas["tiny-r1-home02"].child.pid).environ()
    home = str(state_dir / "home")
    assert env1["HOME"] == home
    if "XDG_CACHE_HOME" not in os.environ and "HF_HOME" not in os.environ:
        assert env1["XDG_CACHE_HOME"] == f"{home}/.cache"
        assert env1["HF_HOME"] == f"{home}/.cache/huggingface"
    assert env2["HF_HOME"] == "/models/hf", "the spec's env wins"


async def test_state_file_and_logs_are_private(make_supervisor, state_dir: Path) -> None:
    sup = await make_supervisor()
    s = spec("tiny-r1-privat", env={"TOKEN": "secret"})
    await sup.deploy(s)
    await wait_for(lambda: sup.replicas[s.name].state == "ready", "ready")
    await sup._persist()
    assert (state_dir / "replicas.json").stat().st_mode & 0o777 == 0o600
    assert (state_dir / "logs" / f"{s.name}.log").stat().st_mode & 0o777 == 0o600


async def test_a_failed_replica_is_forgotten_after_a_while(make_supervisor, monkeypatch) -> None:
    sup = await make_supervisor()
    s = spec("tiny-r1-failed", "--exit-at-start", "3", crash_loop_restarts=0)
    await sup.deploy(s)
    await wait_for(lambda: sup.replicas[s.name].state == "failed", "failed")
    sup._prune()
    assert s.name in sup.replicas, "kept a while, so its reason can be read"
    sup.replicas[s.name].stopped_at = -1e9  # long ago
    sup._prune()
    assert s.name not in sup.replicas
    await sup._persist()
    assert load(sup.state_dir) == []


async def test_a_drain_without_timeout_uses_the_specs_drain_timeout(
        make_supervisor, tmp_path: Path) -> None:
    sup = await make_supervisor()
    s = spec("tiny-r1-dtime1", "--control", str(tmp_path), drain_timeout_s=0.5)
    (tmp_path / "running").write_text("3")
    await sup.deploy(s)
    await wait_for(lambda: sup.replicas[s.name].state == "ready", "ready")
    with capture_logs() as logs:
        await sup.stop(s.name, drain=True, wait=True)
    assert any(e["event"] == "replica_drain_timeout" and e["timeout_s"] == 0.5 for e in logs)


async def test_a_replica_waits_for_a_free_port_instead_of_failing(make_supervisor) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        sup = await make_supervisor(port_range=(port, port))
        s = spec("tiny-r1-portwt")
        await sup.deploy(s)
        await wait_for(lambda: "waiting for a port" in (sup.replicas[s.name].reason or ""),
                       "waiting for a port")
        assert sup.replicas[s.name].state == "starting"
    finally:
        busy.close()
    await wait_for(lambda: sup.replicas[s.name].state == "ready", "ready once the port is free")
    assert sup.replicas[s.name].port == port


async def test_an_internal_error_fails_the_replica_without_leaving_its_process(
        make_supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = await make_supervisor()

    async def broken(replica: object, exited: object) -> bool:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(sup, "_until_ready", broken)
    s = spec("tiny-r1-interr")
    await sup.deploy(s)
    await wait_for(lambda: sup.replicas[s.name].state == "failed", "failed")
    assert "internal error: ZeroDivisionError: a bug" in (sup.replicas[s.name].reason or "")
    assert replica_processes(sup.state_dir, s.name) == []


async def test_gpu_memory_in_use_counts_ready_replicas_per_gpu(make_supervisor) -> None:
    sup = await make_supervisor([])
    gib = 1024**3
    await sup.deploy(spec("tiny-r1-aaaaaa", gpus=[0, 1], gpu_memory_bytes=4 * gib))
    assert sup.gpu_memory_in_use() == {}, "not before the server is ready"
    await wait_for(lambda: sup.replicas["tiny-r1-aaaaaa"].state == "ready", "ready")
    await sup.deploy(spec("tiny-r1-bbbbbb", gpus=[1], gpu_memory_bytes=2 * gib))
    await wait_for(lambda: sup.replicas["tiny-r1-bbbbbb"].state == "ready", "ready")
    assert sup.gpu_memory_in_use() == {0: 4 * gib, 1: 6 * gib}
