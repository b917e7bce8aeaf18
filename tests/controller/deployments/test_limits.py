"""Bounds and bookkeeping: how many replicas, how many per pass, which deployments a pass
looks at, duplicate events, replica names, commands while the broker is away."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from llm_ops_helper.controller.config import parse
from llm_ops_helper.controller.deployments.commands import CommandError
from llm_ops_helper.controller.deployments.errors import Invalid
from llm_ops_helper.controller.deployments.spec import parse_spec
from llm_ops_helper.controller.mqtt import ControllerLink
from llm_ops_helper.controller.state import build_state
from llm_ops_helper.proto.messages import Alert, CommandKind, StopReplica

from .test_engine import deployed, spec
from .world import World


async def test_replicas_are_capped_and_placed_fifty_a_pass(world: World) -> None:
    with pytest.raises(Invalid, match="spec field 'replicas'"):
        parse_spec(b'{"model": "tiny@1", "replicas": 20000}')
    world.engine.apply("sim", spec(replicas=120, gpus_per_replica=0))
    assert len(world.engine.records) == 50  # the pass that answers the apply
    with pytest.raises(Invalid, match="expected an int from 0 to 1000, got 1001"):
        world.engine.scale("sim", 1001)
    assert world.engine.wake.is_set()  # the rest at once, in the next passes
    world.step()
    assert len(world.engine.records) == 100
    world.step()
    assert len(world.engine.records) == 120


async def test_news_reconciles_only_the_deployment_it_concerns(world: World) -> None:
    deployed(world, "one")
    deployed(world, "two")
    world.take()
    a = next(r for r in world.engine.records.values() if r.deployment == "one")
    b = next(r for r in world.engine.records.values() if r.deployment == "two")
    world.set(b.host, b.name, "failed", reason="seen in telemetry only")
    world.report()
    world.engine.on_event(a.host, world.event(a.host, a.name, "failed", "exited"))
    world.clock.advance(0.1)
    world.engine.tick(full=False)
    assert [(s.kind, s.name) for s in world.take()] == [("stop_replica", a.name)]
    world.engine.tick()  # the periodic full pass sees the other
    assert [(s.kind, s.name) for s in world.take()] == [("stop_replica", b.name)]


async def test_alerts_are_read_once_per_placement(world: World) -> None:
    reads = []

    def firing() -> list[Alert]:
        reads.append(1)
        return list(world.alerts.values())

    world.host("host-c")
    world.engine.firing = firing
    world.engine.apply("chat", spec(replicas=3))
    assert len(reads) == 1


async def test_a_redelivered_or_older_event_changes_nothing(world: World) -> None:
    world.engine.apply("chat", spec(replicas=1))
    (sent,) = world.step()
    world.deliver([sent])
    older = world.event(sent.host, sent.name, "starting")
    world.clock.advance(1)
    ready = world.event(sent.host, sent.name, "ready")
    world.engine.wake.clear()
    world.engine.on_event(sent.host, ready)
    assert world.engine.wake.is_set()
    world.engine.wake.clear()
    world.engine.on_event(sent.host, ready)  # QoS 1 redelivery
    world.engine.on_event(sent.host, older)  # late
    assert not world.engine.wake.is_set()
    assert world.engine.get("chat")["replicas"][0]["state"] == "ready"


async def test_replica_names_never_collide(world: World) -> None:
    suffixes = iter(["aaaaaa", "aaaaaa", "aaaaaa", "bbbbbb"])
    world.engine.suffix = lambda: next(suffixes)
    world.engine.apply("chat", spec(replicas=2))
    assert sorted(world.engine.records) == ["chat-r1-aaaaaa", "chat-r1-bbbbbb"]


async def test_rollback_to_a_version_never_deployed_names_it_and_is_checked(
        world: World) -> None:
    deployed(world)
    view = world.engine.rollback("chat", "tiny@3")
    assert view["version"] == "tiny@3" and view["spec"]["model"] == "tiny@3"
    for host in ("host-a", "host-b"):  # now no host offers the version's runtime
        world.host(host, runtimes=("vllm",))
    with pytest.raises(Invalid, match="no online host offers runtime sim"):
        world.engine.rollback("chat", "tiny@2")


async def test_observer_forgets_hosts_the_fleet_forgot(world: World) -> None:
    deployed(world)
    assert set(world.engine.observer._samples) == {"host-a", "host-b"}
    world.offline("host-b")
    world.fleet.gone(world.clock() + 10, 1.0)
    world.engine.tick()
    assert set(world.engine.observer._samples) == {"host-a"}


async def test_commands_wait_for_no_link_and_expired_ones_are_dropped(tmp_path: Path) -> None:
    state = build_state(parse(f'[broker]\nhost = "x"\n[state]\ndir = "{tmp_path}"\n',
                              "c.toml"))
    sender = state.deployments.sender
    sender.secret_for = lambda host: b"secret"
    stop = StopReplica(name="chat-r1-abcdef", drain=False, timeout_s=0.0)
    with pytest.raises(CommandError, match="broker link is down"):
        sender.send("host-a", CommandKind.STOP_REPLICA, stop)
    assert state.commands_out.empty()
    state.link_connected = lambda: True
    sender.send("host-a", CommandKind.STOP_REPLICA, stop)
    while not state.commands_out.full():
        state.commands_out.put_nowait(("t", b"", time.time() + 60))
    with pytest.raises(CommandError, match="already wait"):
        sender.send("host-a", CommandKind.STOP_REPLICA, stop)

    queue: asyncio.Queue[tuple[str, bytes, float]] = asyncio.Queue()
    link = ControllerLink(state.config.broker, lambda t, p: None, state.mqtt_alerts, queue)
    queue.put_nowait(("old", b"1", time.time() - 1))
    queue.put_nowait(("new", b"2", time.time() + 60))
    assert await link.next_command() == ("new", b"2")
    assert link.commands_expired == 1
    state.store.close()
    state.registry.close()
    state.deployments.store.close()
