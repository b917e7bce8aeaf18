"""Replicas that fail, agents that refuse, versions that are gone: the engine backs off, says
why, and never churns or rolls back to what it cannot run."""

from __future__ import annotations

import sqlite3

import pytest

from llm_ops_helper.controller.deployments.errors import Conflict
from llm_ops_helper.controller.deployments.reconciler import Deployments
from llm_ops_helper.controller.deployments.spec import RollbackPolicy
from llm_ops_helper.controller.deployments.store import Deployment
from llm_ops_helper.controller.registry.errors import Conflict as RegistryConflict
from llm_ops_helper.proto.messages import CommandResult

from .test_engine import deployed, spec
from .world import World


def settled(w: World) -> None:
    """Every command so far answered ok (the world's agents apply them; results aside)."""
    w.take()
    w.engine.sender.outstanding.clear()


def refuse_deploys(w: World, error: str = "disk full") -> int:
    """Agents answer every outstanding deploy_replica with an error; how many."""
    refused = 0
    for command_id, o in list(w.engine.sender.outstanding.items()):
        if o.kind == "deploy_replica":
            w.engine.on_result(CommandResult(command_id=command_id, host=o.host,
                                             status="error", ts=w.clock(), error=error))
            refused += 1
    return refused


def tick(w: World, seconds: float) -> list[tuple[str, str]]:
    w.clock.advance(seconds)
    w.engine.tick()
    return [(s.kind, s.host) for s in w.take()]


async def test_a_refused_replacement_backs_off_and_avoids_the_host(world: World) -> None:
    deployed(world)
    settled(world)
    failed = next(iter(world.agents["host-a"]))
    world.engine.on_event("host-a", world.event("host-a", failed, "failed", "CUDA error"))
    sent = [(s.kind, s.host) for s in world.step()]
    assert sent == [("stop_replica", "host-a")]  # no replacement at once
    view = world.engine.get("chat")
    assert view["phase"] == "degraded"
    assert "1 replica failure in a row, no new replica for 10 s" in view["message"]
    assert "CUDA error" in view["message"]
    deploys = []
    for _ in range(40):  # 2 s of passes at 20 Hz, every refusal waking the loop
        deploys += [h for k, h in tick(world, 0.05) if k == "deploy_replica"]
        refuse_deploys(world)
    assert deploys == []
    deploys = [h for k, h in tick(world, 8.5) if k == "deploy_replica"]
    assert deploys == ["host-b"]  # 10 s after the failure; not where it failed
    assert refuse_deploys(world) == 1
    for _ in range(40):
        deploys = [h for k, h in tick(world, 0.05) if k == "deploy_replica"]
        assert deploys == []
    view = world.engine.get("chat")
    assert "2 replica failures in a row, no new replica for 20 s" in view["message"]
    assert "disk full" in view["message"]
    assert len(world.engine.records) <= 3  # failed records do not pile up
    # A replacement that comes up ends the run of failures.
    sent = world.step(20)
    assert [s.kind for s in sent].count("deploy_replica") == 1
    world.deliver(sent)
    for _ in range(3):
        world.deliver(world.step())
        world.ready_all()
    world.step()
    view = world.engine.get("chat")
    assert view["phase"] == "available" and view["ready"] == 2


async def test_a_version_in_use_for_rollback_cannot_be_retired(world: World) -> None:
    deployed(world)
    world.engine.apply("chat", spec("tiny@2"))
    for _ in range(6):
        world.deliver(world.step())
        world.ready_all()
    assert world.engine.get("chat")["previous_version"] == "tiny@1"
    assert world.engine.refs_in_use() == {"tiny@1", "tiny@2"}
    with pytest.raises(RegistryConflict, match="tiny@1 is used by a deployment"):
        world.registry.set_stage("tiny", 1, "retired")
    v1 = world.registry.version("tiny", "1")
    assert v1.artifact is not None and world.registry.blobs.exists(v1.artifact.sha256)


async def test_rollback_to_a_version_whose_artifact_is_gone_is_refused(world: World) -> None:
    deployed(world)
    world.engine.apply("chat", spec("tiny@2"))
    for _ in range(6):
        world.deliver(world.step())
        world.ready_all()
    v1 = world.registry.version("tiny", "1")
    assert v1.artifact is not None
    world.registry.blobs.delete(v1.artifact.sha256)  # an operator cleaned the disk
    with pytest.raises(Conflict, match="cannot roll back to tiny@1: its artifact"):
        world.engine.rollback("chat")
    assert world.engine.get("chat")["version"] == "tiny@2"


async def test_automatic_rollback_to_a_missing_artifact_fails_the_rollout(world: World) -> None:
    deployed(world)
    v1 = world.registry.version("tiny", "1")
    assert v1.artifact is not None
    world.registry.blobs.delete(v1.artifact.sha256)
    world.engine.apply("chat", spec("tiny@3"))
    (sent,) = world.step()
    world.deliver([sent])
    world.engine.on_event(sent.host, world.event(sent.host, sent.name, "failed", "bad flag"))
    world.step()
    view = world.engine.get("chat")
    assert view["phase"] == "failed" and view["version"] == "tiny@3"
    assert "no rollback to tiny@1: its artifact" in view["message"]
    assert [r["revision"] for r in world.engine.history("chat")["revisions"]] == [1, 2]


async def test_a_new_replica_stopped_by_its_agent_is_replaced_not_a_failure(
        world: World) -> None:
    deployed(world)
    world.engine.apply("chat", spec("tiny@2"))
    (first,) = world.step()
    world.deliver([first])
    world.set(first.host, first.name, "stopped", reason="agent restarting")
    sent = world.step()
    assert [s.kind for s in sent] == ["deploy_replica"]  # a replacement, no rollback
    view = world.engine.get("chat")
    assert view["version"] == "tiny@2" and view["phase"] == "progressing"
    assert first.name not in world.engine.records
    assert world.engine.history("chat")["revisions"][1]["failed"] is None


async def test_a_drain_the_agent_refuses_becomes_a_stop_and_says_why(world: World) -> None:
    deployed(world)
    settled(world)
    world.engine.scale("chat", 1)
    (drain,) = world.take()
    assert drain.kind == "drain_replica"
    (command_id,) = world.engine.sender.outstanding
    world.engine.on_result(CommandResult(command_id=command_id, host=drain.host,
                                         status="error", ts=world.clock(),
                                         error="command expired"))
    world.step()
    assert "refused drain_replica" in world.engine.get("chat")["message"]
    assert "command expired" in world.engine.get("chat")["message"]
    kinds = []
    for _ in range(10):  # the agent keeps reporting it ready
        kinds += [s.kind for s in world.step(10)]
    assert "stop_replica" in kinds
    assert kinds.index("stop_replica") <= 6  # drain_timeout_s + 3 x retry, not forever


async def test_a_failed_rollout_without_rollback_stops_serving_the_new_version(
        world: World) -> None:
    deployed(world)
    manual = RollbackPolicy(observe_s=0, auto=False)
    world.engine.apply("chat", spec("tiny@2", rollback=manual))
    (first,) = world.step()
    world.deliver([first])
    world.ready_all()
    sent = world.step()
    assert sorted(s.kind for s in sent) == ["deploy_replica", "drain_replica"]
    world.deliver(sent)
    second = next(s for s in sent if s.kind == "deploy_replica")
    world.engine.on_event(second.host, world.event(second.host, second.name, "failed", "oom"))
    sent = world.step()
    assert sorted((s.kind, s.name) for s in sent) == sorted(
        [("drain_replica", first.name), ("stop_replica", second.name)])
    view = world.engine.get("chat")
    assert view["phase"] == "failed"
    assert {e["version"] for e in world.engine.endpoints("chat")} == {"tiny@1"}


async def test_one_deployment_raising_does_not_stop_the_others(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.engine.apply("bad", spec(replicas=1))
    world.engine.apply("good", spec(replicas=1))
    world.take()
    reconcile = Deployments._reconcile

    def broken(self: Deployments, d: Deployment, now: float) -> None:
        if d.name == "bad":
            raise KeyError("a bug")
        reconcile(self, d, now)

    monkeypatch.setattr(Deployments, "_reconcile", broken)
    world.engine.scale("good", 2)
    world.engine.tick()
    assert world.engine.tick_errors == 1
    assert len(world.engine.get("good")["replicas"]) == 2


async def test_a_failed_write_leaves_no_half_made_deployment(world: World) -> None:
    deployed(world)
    world.engine.store.db.close()
    with pytest.raises(sqlite3.Error):
        world.engine.apply("other", spec())
    with pytest.raises(sqlite3.Error):
        world.engine.apply("chat", spec("tiny@2"))
    assert [v["name"] for v in world.engine.list_views()] == ["chat"]
    assert world.engine.get("chat")["revision"] == 1
    assert world.engine.refs_in_use() == {"tiny@1"}
