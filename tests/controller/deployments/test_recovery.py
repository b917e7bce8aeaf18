"""The engine after a controller restart or a broker outage: what it does not know yet, it
leaves alone; agents' clocks do not decide what came after what."""

from __future__ import annotations

from llm_ops_helper.controller.deployments.spec import RollbackPolicy

from .test_engine import deployed, kinds, spec
from .world import World


def event_kinds(w: World, name: str = "chat") -> list[str]:
    return [e["kind"] for e in w.engine.history(name)["events"]]


async def test_restart_mid_rollout_stops_nothing_before_the_agents_report(world: World) -> None:
    deployed(world)
    old = set(world.agents["host-a"]) | set(world.agents["host-b"])
    world.engine.apply("chat", spec("tiny@2"))
    first = world.step()
    assert [s.kind for s in first] == ["deploy_replica"]
    world.deliver(first)
    world.restart()  # retained statuses: both hosts online, no telemetry yet
    world.clock.advance(15)  # past command_retry_s since the deploy was sent
    world.engine.tick()
    assert world.take() == []  # no stop of a ready old replica, no blind resend
    sent = world.step()  # telemetry: the old ones ready, the new one starting
    assert sent == []
    assert world.engine.get("chat")["ready"] == 2
    for _ in range(6):
        world.ready_all()
        world.deliver(sent)
        assert all(s.kind != "stop_replica" for s in sent)
        assert len(world.engine.endpoints("chat")) >= 2 or world.engine.get("chat")["ready"] >= 2
        sent = world.step()
    view = world.engine.get("chat")
    assert view["phase"] == "available" and set(world.running().values()) == {"tiny@2"}
    assert old.isdisjoint(world.running())


async def test_broker_down_at_start_forgets_no_replica(world: World) -> None:
    before = deployed(world)
    world.take()
    world.restart(broker=False)
    for _ in range(20):  # 200 s without the broker: nobody heard, nobody lost
        world.clock.advance(10)
        world.engine.tick()
    assert len(world.engine.records) == 2
    world.link = True  # connected, yet nothing arrives: no host heard of at all
    for _ in range(20):
        world.clock.advance(10)
        world.engine.tick()
    assert len(world.engine.records) == 2
    assert "replica_lost" not in event_kinds(world)
    world.broker_back()
    assert world.step() == []  # the agents report what they run: nothing to do
    after = world.engine.get("chat")
    assert after["phase"] == "available"
    assert [r["name"] for r in after["replicas"]] == [r["name"] for r in before["replicas"]]
    assert "orphan_stopped" not in event_kinds(world)


async def test_a_host_counts_as_lost_from_the_reconnect_not_from_start(world: World) -> None:
    deployed(world)
    lost = next(iter(world.agents["host-b"]))
    world.take()
    world.down.add("host-b")  # it went away while the controller was down
    world.restart(broker=False)
    world.clock.advance(300)
    world.engine.tick()
    assert world.take() == []
    world.broker_back()
    assert world.step(1) == []  # the engine sees the link up
    assert world.step(30) == []  # within grace, counted from the reconnect
    sent = world.step(31)
    assert kinds(sent) == [("deploy_replica", "host-a")]
    assert lost not in world.engine.records


async def test_agent_clock_behind_does_not_keep_a_drained_replica_forever(world: World) -> None:
    world.skew = {"host-a": -3600.0, "host-b": -3600.0}  # agents' clocks an hour behind
    deployed(world)
    world.engine.scale("chat", 1)
    (drain,) = world.step()
    assert drain.kind == "drain_replica"
    del world.agents[drain.host][drain.name]  # gone from the agent's reports
    world.step()
    assert drain.name not in world.engine.records
    assert len(world.engine.get("chat")["replicas"]) == 1


async def test_agent_clock_ahead_does_not_make_an_old_snapshot_count(world: World) -> None:
    world.skew = {"host-a": 3600.0, "host-b": 3600.0}  # an hour ahead
    world.engine.apply("chat", spec(replicas=1))
    (deploy,) = world.step()
    world.engine.scale("chat", 0)  # before the agent has even applied the deploy
    (stop,) = world.take()
    assert (stop.kind, stop.name) == ("stop_replica", deploy.name)
    # The snapshot held arrived before the stop was sent (by the controller's clock, whatever
    # the agent's says): it does not show the replica gone, so its record stays.
    world.engine.tick()
    assert deploy.name in world.engine.records
    world.deliver([deploy, stop])
    world.step()  # a snapshot after the stop, showing it stopped: now it is forgotten
    assert deploy.name not in world.engine.records


async def test_canary_window_starts_again_after_a_restart(world: World) -> None:
    canary = RollbackPolicy(observe_s=30)
    world.engine.apply("chat", spec(rollback=canary))
    world.deliver(world.step())
    world.ready_all()
    world.step()
    world.engine.apply("chat", spec("tiny@2", rollback=canary))
    sent = world.step()
    world.deliver(sent)
    world.ready_all()
    new = sent[0].name
    # The new replica had failures while warming up, before the comparison window.
    for host, replicas in world.agents.items():
        for name in replicas:
            if name == new:
                world.traffic(host, name, requests=40.0, failed=20.0)
            else:
                world.traffic(host, name, requests=500.0)
    assert world.step() == []  # the canary starts, baselines taken
    assert "canary_started" in event_kinds(world)
    world.restart()
    world.step()  # telemetry back: the window starts again, baselines taken anew
    for host, replicas in world.agents.items():  # 100 clean requests on each since
        for name in replicas:
            if name == new:
                world.traffic(host, name, requests=140.0, failed=20.0)
            else:
                world.traffic(host, name, requests=600.0)
    sent = world.step(31)
    assert "canary_passed" in event_kinds(world), event_kinds(world)
    assert sorted(s.kind for s in sent) == ["deploy_replica", "drain_replica"]
    assert world.engine.get("chat")["version"] == "tiny@2"
    assert "canary_restarted" in event_kinds(world)
