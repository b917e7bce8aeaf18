"""The deployment engine end to end, in process: real registry, real fleet fed with wire
messages, real SQLite, commands verified as an agent verifies them."""

from __future__ import annotations

import msgspec
import pytest

from llm_ops_helper.controller.deployments.errors import Conflict, Invalid, NotFound
from llm_ops_helper.controller.deployments.spec import DeploymentSpec, RollbackPolicy
from llm_ops_helper.proto.messages import Alert, CommandResult, ReplicaSpec

from .world import GIB, World

NO_CANARY = RollbackPolicy(observe_s=0)


def spec(model: str = "tiny@1", replicas: int = 2, **fields: object) -> DeploymentSpec:
    fields.setdefault("rollback", NO_CANARY)
    fields.setdefault("gpus_per_replica", 1)
    return DeploymentSpec(model=model, replicas=replicas, **fields)  # type: ignore[arg-type]


def deployed(w: World, name: str = "chat") -> dict[str, object]:
    """Apply, deliver, make ready: a deployment that is available."""
    w.engine.apply(name, spec())
    w.deliver(w.step())
    w.ready_all()
    w.step()
    view = w.engine.get(name)
    assert view["phase"] == "available", view
    return view


def kinds(sent: list) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    return sorted((s.kind, s.host) for s in sent)


async def test_apply_places_signed_deploys_then_becomes_available(world: World) -> None:
    view, created = world.engine.apply("chat", spec(), by="alice")
    assert created and view["version"] == "tiny@1" and view["revision"] == 1
    sent = world.step()
    assert kinds(sent) == [("deploy_replica", "host-a"), ("deploy_replica", "host-b")]
    body = msgspec.convert(sent[0].body, ReplicaSpec)
    assert body.deployment == "chat" and body.version == "tiny@1" and body.runtime == "sim"
    assert body.name.startswith("chat-r1-") and len(body.name) == len("chat-r1-") + 6
    assert body.served_model_name == "chat" and body.gpus == [0]
    assert body.artifact is not None
    assert body.artifact.url == (f"http://head:8470/api/v1/artifacts/{body.artifact.sha256}"
                                 "?host=host-a")  # signed for the host it is sent to
    assert body.gpu_memory_bytes == int(body.artifact.size_bytes * 1.2) + 256 * (1 << 20)
    world.deliver(sent)
    assert world.engine.get("chat")["phase"] == "progressing"
    world.ready_all()
    assert world.step() == []
    view = world.engine.get("chat")
    assert view["phase"] == "available" and view["ready"] == 2
    assert view["message"] == "2/2 replicas of tiny@1 ready"
    assert {e["host"] for e in world.engine.endpoints("chat")} == {"host-a", "host-b"}
    assert all(p.split(": ", 1)[1].startswith(("host-a", "host-b")) for p in view["placement"])
    kinds_seen = [e["kind"] for e in world.engine.history("chat")["events"]]
    assert kinds_seen[:3] == ["deployment_applied", "replica_placed", "replica_placed"]
    assert "rollout_completed" in kinds_seen


async def test_rolling_update_surge_one_and_history(world: World) -> None:
    deployed(world)
    old = set(world.running())
    view, created = world.engine.apply("chat", spec("tiny@2"), by="bob")
    assert not created and view["revision"] == 2
    steps = []
    for _ in range(8):
        sent = world.step()
        steps.append(kinds(sent))
        world.deliver(sent)
        world.ready_all()
        endpoints = world.engine.endpoints("chat")
        assert len(endpoints) >= 2 or world.engine.get("chat")["ready"] >= 2
    assert [[k for k, _ in step] for step in steps] == [
        ["deploy_replica"], ["deploy_replica", "drain_replica"], ["drain_replica"],
        [], [], [], [], []]
    # Spread kept: the first old replica drained is the one sharing a host with a new one.
    assert steps[1][1][1] == steps[0][0][1]
    view = world.engine.get("chat")
    assert view["phase"] == "available" and view["version"] == "tiny@2"
    assert set(world.running()).isdisjoint(old)
    assert set(world.running().values()) == {"tiny@2"}
    assert sorted(r["host"] for r in view["replicas"]) == ["host-a", "host-b"]
    assert view["previous_version"] == "tiny@1"
    history = world.engine.history("chat")
    assert [(r["revision"], r["version"], r["by"]) for r in history["revisions"]] == [
        (1, "tiny@1", "anonymous"), (2, "tiny@2", "bob")]
    assert history["revisions"][1]["reason"] == "bob changed model tiny@1 -> tiny@2"


async def test_a_rolling_update_of_cpu_replicas_keeps_them_on_two_hosts(world: World) -> None:
    """With nothing to tell hosts apart but the spread, the old version's replicas (all on their
    way out) must not count: they once drew both new replicas onto one host."""
    world.engine.apply("cpu", spec(gpus_per_replica=0))
    world.deliver(world.step())
    world.ready_all()
    world.step()
    world.engine.apply("cpu", spec("tiny@2", gpus_per_replica=0))
    for _ in range(8):
        sent = world.step()
        world.deliver(sent)
        world.ready_all()
    view = world.engine.get("cpu")
    assert view["phase"] == "available" and view["version"] == "tiny@2"
    assert sorted(r["host"] for r in view["replicas"]) == ["host-a", "host-b"]


async def test_new_version_exiting_at_start_rolls_back_automatically(world: World) -> None:
    deployed(world)
    world.engine.apply("chat", spec("tiny@3"))
    sent = world.step()
    world.deliver(sent)
    new = sent[0].name
    world.engine.on_event(sent[0].host, world.event(
        sent[0].host, new, "failed", "exited at start with code 1: bad flag"))
    sent = world.step()
    assert [(s.kind, s.name) for s in sent] == [("stop_replica", new)]
    view = world.engine.get("chat")
    assert view["phase"] == "rolling_back" and view["version"] == "tiny@1"
    assert view["message"] == (f"automatic rollback from tiny@3: replica {new} on "
                               f"{sent[0].host} failed: exited at start with code 1: bad flag")
    world.deliver(sent)
    assert world.step() == []  # the old replicas are the rollback's: nothing to start
    view = world.engine.get("chat")
    assert view["phase"] == "available" and view["revision"] == 3
    assert "rolled back" in view["message"]
    assert set(world.running().values()) == {"tiny@1"}
    revisions = world.engine.history("chat")["revisions"]
    assert revisions[1]["failed"].startswith("automatic rollback from tiny@3")
    assert revisions[2]["by"] == "controller"
    # Not retried: the deployment stays on the old version.
    for _ in range(3):
        assert world.step() == []


async def test_manual_rollback_and_its_refusals(world: World) -> None:
    deployed(world)
    with pytest.raises(Conflict, match="no version before tiny@1"):
        world.engine.rollback("chat")
    world.engine.apply("chat", spec("tiny@2"))
    for _ in range(6):
        world.deliver(world.step())
        world.ready_all()
    assert world.engine.get("chat")["version"] == "tiny@2"
    view = world.engine.rollback("chat", by="carol")
    assert view["version"] == "tiny@1" and view["phase"] == "rolling_back"
    for _ in range(6):
        world.deliver(world.step())
        world.ready_all()
    view = world.engine.get("chat")
    assert view["phase"] == "available" and set(world.running().values()) == {"tiny@1"}
    assert world.engine.history("chat")["revisions"][-1]["reason"] == "rollback to tiny@1 by carol"
    with pytest.raises(Conflict, match="already runs tiny@1"):
        world.engine.rollback("chat", "tiny@1")
    with pytest.raises(NotFound):
        world.engine.rollback("chat", "tiny@9")


async def test_a_plain_rollback_skips_the_version_that_failed(world: World) -> None:
    # tiny@1 -> tiny@2 -> tiny@3 (fails, rolled back to tiny@2); "rollback" means tiny@1, not
    # the version that just failed.
    deployed(world)
    world.engine.apply("chat", spec("tiny@2"))
    for _ in range(6):
        world.deliver(world.step())
        world.ready_all()
    world.engine.apply("chat", spec("tiny@3"))
    sent = world.step()
    world.deliver(sent)
    world.engine.on_event(sent[0].host, world.event(sent[0].host, sent[0].name, "failed",
                                                    "exited at start with code 1"))
    for _ in range(6):
        world.deliver(world.step())
        world.ready_all()
    assert world.engine.get("chat")["version"] == "tiny@2"
    view = world.engine.rollback("chat", by="carol")
    assert view["version"] == "tiny@1"


async def test_first_deploy_failing_is_failed_and_cleaned_up(world: World) -> None:
    world.engine.apply("chat", spec())
    sent = world.step()
    world.deliver(sent)
    for s in sent:
        world.engine.on_event(s.host, world.event(s.host, s.name, "failed",
                                                  "exited at start with code 2: no such file"))
    sent = world.step()
    assert sorted(s.kind for s in sent) == ["stop_replica", "stop_replica"]
    view = world.engine.get("chat")
    assert view["phase"] == "failed"
    assert "exited at start with code 2: no such file" in view["message"]
    world.deliver(sent)
    for _ in range(3):
        assert world.step() == []  # no endless retries
    assert world.engine.get("chat")["replicas"] == []
    assert world.running() == {}


async def test_agent_refusing_a_deploy_fails_the_replica(world: World) -> None:
    world.engine.apply("chat", spec(replicas=1))
    sent = world.step()
    (command_id,) = world.engine.sender.outstanding
    world.engine.on_result(CommandResult(command_id=command_id, host=sent[0].host,
                                         status="error", ts=world.clock(),
                                         error="runtime 'sim' is not available here"))
    world.step()
    view = world.engine.get("chat")
    assert view["phase"] == "failed"
    assert "refused replica" in view["message"] and "not available here" in view["message"]


async def test_bad_input_is_refused_naming_the_cause(world: World) -> None:
    with pytest.raises(NotFound, match=r"tiny has no version 9 \(latest is 3\)"):
        world.engine.apply("chat", spec("tiny@9"))
    with pytest.raises(Invalid, match=r"no online host with runtime sim has a GPU of "
                                      r"500.0 GiB or more; the largest is 80.0 GiB"):
        world.engine.apply("chat", spec(gpu_memory_bytes=500 * GIB))
    with pytest.raises(Invalid, match="no online host offers runtime vllm"):
        world.engine.apply("chat", spec(runtime="vllm"))
    with pytest.raises(Invalid, match="deployment name"):
        world.engine.apply("Chat_1", spec())
    assert world.engine.list_views() == []  # nothing half-done stays behind
    assert world.step() == []


async def test_restart_resumes_from_sqlite_without_redeploying(world: World) -> None:
    before = deployed(world)
    world.engine.store.close()
    world.engine = world.new_engine()
    assert world.step() == []
    after = world.engine.get("chat")
    assert after["phase"] == "available"
    assert [r["name"] for r in after["replicas"]] == [r["name"] for r in before["replicas"]]
    world.engine.scale("chat", 3)
    assert kinds(world.step()) in ([("deploy_replica", "host-a")],
                                   [("deploy_replica", "host-b")])


async def test_restart_mid_rollout_carries_on(world: World) -> None:
    deployed(world)
    world.engine.apply("chat", spec("tiny@2"))
    first = world.step()
    assert [s.kind for s in first] == ["deploy_replica"]
    world.engine.store.close()
    world.engine = world.new_engine()
    world.deliver(first)
    world.ready_all()
    sent = world.step()
    assert sorted(s.kind for s in sent) == ["deploy_replica", "drain_replica"]
    assert world.engine.get("chat")["revision"] == 2
    for _ in range(4):
        world.deliver(sent)
        world.ready_all()
        sent = world.step()
    view = world.engine.get("chat")
    assert view["phase"] == "available" and set(world.running().values()) == {"tiny@2"}


async def test_scale_down_drains_and_forgets(world: World) -> None:
    deployed(world)
    world.engine.scale("chat", 1, by="dave")
    sent = world.step()
    assert [s.kind for s in sent] == ["drain_replica"]
    assert len(world.engine.endpoints("chat")) == 1  # out of the endpoints at once
    world.deliver(sent)
    world.step()
    assert len(world.engine.get("chat")["replicas"]) == 1
    with pytest.raises(Invalid, match="above max_replicas 2"):
        world.engine.apply("chat", spec(max_replicas=2, replicas=3))


async def test_unsent_deploy_is_resent_and_agents_are_idempotent(world: World) -> None:
    world.engine.apply("chat", spec(replicas=1))
    first = world.step()
    assert world.step(5) == []
    again = world.step(6)  # 11 s after the send, and the agent does not report it
    assert [(s.kind, s.name, s.body) for s in again] == \
        [(s.kind, s.name, s.body) for s in first]


async def test_lost_host_replica_is_replaced_and_returning_one_stopped(world: World) -> None:
    deployed(world)
    lost = next(n for n in world.agents["host-b"])
    world.host("host-c")
    world.offline("host-b")
    assert world.step(30) == []  # within grace
    sent = world.step(31)
    assert kinds(sent) == [("deploy_replica", "host-c")]
    kinds_seen = [e["kind"] for e in world.engine.history("chat")["events"]]
    assert "replica_lost" in kinds_seen
    world.deliver(sent)
    world.ready_all()
    world.host("host-b")  # back, still running the replica given up on
    sent = world.step()
    assert [(s.kind, s.host, s.name) for s in sent] == [("drain_replica", "host-b", lost)]


async def test_orphan_replicas_are_stopped(world: World) -> None:
    deployed(world)
    world.agents["host-a"]["chat-r9-abcdef"] = world.agents["host-a"][
        next(iter(world.agents["host-a"]))].__class__(
        name="chat-r9-abcdef", runtime="sim", up=False, state="starting", deployment="chat")
    sent = world.step()
    assert [(s.kind, s.name, s.body["drain"]) for s in sent] == [
        ("stop_replica", "chat-r9-abcdef", False)]
    assert world.step(1) == []  # not repeated before command_retry_s


async def test_critical_gpu_alert_keeps_replicas_off_that_gpu(world: World) -> None:
    world.alerts["x"] = Alert(id="1", key="x", state="firing", severity="critical",
                              rule="gpu_xid", host="host-a", gpu=0, summary="XID 79", ts=0.0)
    world.engine.apply("chat", spec(replicas=2))
    sent = world.step()
    assert kinds(sent) == [("deploy_replica", "host-b"), ("deploy_replica", "host-b")]
    world.deliver(sent)
    world.engine.apply("big", spec(replicas=1, gpus_per_replica=1, gpu_memory_bytes=int(79.5 * GIB)))
    assert world.step() == []  # host-b's GPU holds the two reservations, host-a's is barred
    view = world.engine.get("big")
    assert view["phase"] == "progressing"
    assert "not placed" in view["message"] and "gpu_xid" in view["message"]
    assert view["placement"][-1].startswith("not placed: 1 of 1 replica of big not placed")
    events = world.engine.history("big")["events"]
    assert [e["kind"] for e in events].count("placement_refused") == 1
    assert world.step(11) == []
    assert [e["kind"] for e in world.engine.history("big")["events"]].count(
        "placement_refused") == 1  # said once, not every pass


async def test_canary_compares_and_rolls_back_on_error_rate(world: World) -> None:
    world.engine.apply("chat", spec(rollback=RollbackPolicy(observe_s=30)))
    world.deliver(world.step())
    world.ready_all()
    world.step()
    world.engine.apply("chat", spec("tiny@2", rollback=RollbackPolicy(observe_s=30)))
    sent = world.step()
    world.deliver(sent)
    world.ready_all()
    assert world.step() == []  # first new ready: canary starts, rollout holds
    assert "observing the first new replica" in world.engine.get("chat")["message"]
    for host, replicas in world.agents.items():
        for name, r in replicas.items():
            failed = 20.0 if r.version == "tiny@2" else 0.0
            world.traffic(host, name, requests=100.0, failed=failed)
    assert world.step(10) == []  # still observing
    sent = world.step(25)
    assert [s.kind for s in sent] == ["drain_replica"]  # the new one, ready, drained
    view = world.engine.get("chat")
    assert view["phase"] in ("rolling_back", "available")
    assert "error rate 20.0% on tiny@2" in world.engine.history("chat")["revisions"][1]["failed"]


async def test_a_canary_ready_by_its_event_before_any_snapshot_is_still_judged(
        world: World) -> None:
    # The first new replica's "ready" event can beat the first snapshot that carries its
    # counters: its baseline is zero (a fresh server), not "unknown, leave it out".
    world.engine.apply("chat", spec(rollback=RollbackPolicy(observe_s=30)))
    world.deliver(world.step())
    world.ready_all()
    world.step()
    world.engine.apply("chat", spec("tiny@2", rollback=RollbackPolicy(observe_s=30)))
    sent = world.take()
    assert [s.kind for s in sent] == ["deploy_replica"]
    world.deliver(sent)
    new = sent[0]
    world.engine.on_event(new.host, world.event(new.host, new.name, "ready"))
    world.engine.tick()  # no snapshot since: the canary window opens on the event alone
    assert "observing the first new replica" in world.engine.get("chat")["message"]
    for host, replicas in world.agents.items():
        for name, r in replicas.items():
            world.traffic(host, name, requests=100.0,
                          failed=30.0 if r.version == "tiny@2" else 0.0)
    world.step(31)
    assert "error rate 30.0% on tiny@2" in world.engine.history("chat")["revisions"][1]["failed"]


async def test_delete_drains_then_removes(world: World) -> None:
    deployed(world)
    view = world.engine.delete("chat", by="erin")
    assert view["phase"] == "deleting"
    with pytest.raises(Conflict, match="being deleted"):
        world.engine.scale("chat", 3)
    sent = world.step()
    assert sorted(s.kind for s in sent) == ["drain_replica", "drain_replica"]
    world.deliver(sent)
    world.step()
    assert world.engine.list_views() == []
    with pytest.raises(NotFound):
        world.engine.get("chat")
    assert world.engine.history("chat")["events"][-1]["kind"] == "deployment_deleted"


async def test_run_loop_wakes_on_apply(world: World) -> None:
    import asyncio

    stop = asyncio.Event()
    world.engine.config = type(world.engine.config)(reconcile_interval_s=3600)
    task = asyncio.create_task(world.engine.run(stop))
    await asyncio.sleep(0.1)
    world.engine.apply("chat", spec(replicas=1))
    for _ in range(100):
        if world.published:
            break
        await asyncio.sleep(0.01)
    assert len(world.take()) == 1
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_alias_is_resolved_once_and_a_later_move_does_not_roll(world: World) -> None:
    world.registry.set_alias("tiny", "stable", 1)
    view, _ = world.engine.apply("chat", spec("tiny@stable"))
    assert view["version"] == "tiny@1" and view["requested"] == "tiny@stable"
    world.deliver(world.step())
    world.ready_all()
    world.step()
    world.registry.set_alias("tiny", "stable", 2)
    assert world.step() == [] and world.step(11) == []
    assert set(world.running().values()) == {"tiny@1"}
    assert world.engine.refs_in_use() == {"tiny@1"}
    # Applying the same spec again now resolves the alias anew: a rollout to tiny@2.
    view, _ = world.engine.apply("chat", spec("tiny@stable"))
    assert view["version"] == "tiny@2" and view["revision"] == 2
    assert world.engine.versions_in_use() == {"tiny@2": ["chat"], "tiny@1": ["chat"]}


async def test_twenty_cpu_replicas_spread_over_four_agents(world: World) -> None:
    world.host("host-c")
    world.host("host-d")
    world.engine.apply("sim", spec(replicas=20, gpus_per_replica=0))
    sent = world.step()
    assert len(sent) == 20
    per_host: dict[str, int] = {}
    for s in sent:
        per_host[s.host] = per_host.get(s.host, 0) + 1
        assert s.body["gpus"] == [] and s.body["gpu_memory_bytes"] is None
    assert per_host == {"host-a": 5, "host-b": 5, "host-c": 5, "host-d": 5}
    world.deliver(sent)
    world.ready_all()
    assert world.step() == []
    view = world.engine.get("sim")
    assert view["phase"] == "available" and view["ready"] == 20
    assert len(world.engine.endpoints("sim")) == 20


async def test_newer_report_wins_between_event_and_telemetry(world: World) -> None:
    world.engine.apply("chat", spec(replicas=1))
    sent = world.step()
    world.deliver(sent)
    host, name = sent[0].host, sent[0].name
    world.engine.on_event(host, world.event(host, name, "ready"))
    assert world.engine.get("chat")["replicas"][0]["state"] == "ready"
    world.set(host, name, "starting")  # an older snapshot would not undo it...
    world.clock.advance(1)
    world.report(host)  # ...but a newer one does
    assert world.engine.get("chat")["replicas"][0]["state"] == "starting"
    # An event from another host about this replica is not believed.
    world.engine.on_event("host-z", world.event(host, name, "failed", "nope"))
    world.set(host, name, "starting")
    world.report(host)
    assert world.engine.get("chat")["replicas"][0]["state"] == "starting"
