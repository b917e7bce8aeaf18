"""The autoscaler on a real engine: decisions from replica telemetry, written only in mode on,
recorded with their inputs, and checkpointed."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from llm_ops_helper.controller.autoscale.autoscaler import Autoscaler, AutoscalerConfig
from llm_ops_helper.controller.autoscale.store import DecisionStore
from llm_ops_helper.controller.deployments.spec import AutoscaleSpec
from llm_ops_helper.proto.messages import Alert

from .conftest import Scene


def desired(scene: Scene, name: str = "chat") -> int:
    return int(scene.world.engine.get(name)["desired"])


async def test_without_metrics_it_holds_and_says_why(scene: Scene) -> None:
    scene.deploy()
    record = scene.tick()
    assert (record["rule"], record["desired"], record["applied"]) == ("no_metrics", 1, False)
    assert record["reason"] == ("no metrics yet (none of its replicas reports metrics yet): "
                                "holding 1 replica")
    scene.load(50.0)
    record = scene.tick()  # one snapshot of the counters: no rate yet
    assert record["rule"] == "no_metrics" and "rates need two" in record["reason"]
    assert desired(scene) == 1


async def test_a_queue_scales_up_through_the_engine(scene: Scene) -> None:
    scene.deploy()
    scene.load(50.0)
    scene.tick()
    scene.load(50.0, waiting=20)
    record = scene.tick()
    # 1 ready plus 1 per 8 waiting: 4, the maximum.
    assert (record["rule"], record["current"], record["desired"]) == ("queue", 1, 4)
    assert record["applied"] and record["error"] is None
    assert desired(scene) == 4
    assert record["inputs"]["requests_waiting"] == 20
    assert record["inputs"]["tokens_per_s"] == pytest.approx(50.0)
    events = scene.world.engine.history("chat")["events"]
    assert any(e["kind"] == "deployment_scaled" and e["data"]["by"] == "autoscaler"
               for e in events)


async def test_advisory_mode_decides_the_same_and_changes_nothing(scene: Scene) -> None:
    scene.deploy(mode="advisory")
    scene.load(50.0)
    scene.tick()
    scene.load(50.0, waiting=20)
    record = scene.tick()
    assert (record["rule"], record["desired"], record["applied"]) == ("queue", 4, False)
    assert record["reason"].endswith("advisory mode, not applied")
    assert desired(scene) == 1


async def test_no_more_than_the_fleet_can_place(scene: Scene) -> None:
    # 60 GiB each on two hosts of one 80 GiB GPU: one more replica per host fits now.
    scene.deploy(gpu_gib=60)
    scene.load(50.0)
    scene.tick()
    scene.load(50.0, waiting=20)
    record = scene.tick()
    assert (record["rule"], record["desired"], record["budget"]) == ("budget", 3, 2)
    assert "only 2 more can be placed" in record["reason"]
    assert desired(scene) == 3


async def test_gpus_with_an_open_critical_alert_are_not_in_the_budget(scene: Scene) -> None:
    # As above, but host-b's GPU has an XID alert: only host-a can take one more.
    scene.world.alerts["xid"] = Alert(id="1", key="xid", state="firing", severity="critical",
                                      rule="gpu_xid", host="host-b", gpu=0, summary="XID 79",
                                      ts=0.0)
    scene.deploy(gpu_gib=60)
    scene.load(50.0)
    scene.tick()
    scene.load(50.0, waiting=20)
    record = scene.tick()
    assert (record["rule"], record["desired"], record["budget"]) == ("budget", 2, 1)
    assert desired(scene) == 2


async def test_scales_down_only_after_the_stabilisation_window(scene: Scene) -> None:
    scene.deploy(scale_down_window_s=5.0)
    scene.load(50.0)
    scene.tick()
    scene.load(300.0)  # 300 tokens/s at 100 each and 80 % utilisation: 4 replicas
    record = scene.tick()
    assert (record["desired"], record["applied"]) == (4, True)
    seen = []
    for _ in range(12):
        scene.load(10.0)
        seen.append(scene.tick())
    rules = [r["rule"] for r in seen]
    assert rules[0] in ("hold", "stabilisation")
    assert seen[-1]["desired"] == 1 and desired(scene) == 1
    first_down = next(r for r in seen if r["desired"] < 4)
    assert first_down["ts"] - record["ts"] >= 5.0


async def test_cold_start_is_measured_from_its_own_replicas(scene: Scene) -> None:
    scene.deploy()
    records = scene.world.engine.ledger.records_of("chat")
    measured = records[0].ready_at - records[0].created_at  # type: ignore[operator]
    record = scene.tick()
    assert record["cold_start_s"] == pytest.approx(measured)
    assert record["forecast"]["horizon_s"] == pytest.approx(measured)


async def test_decisions_are_stored_newest_first_and_mode_off_makes_none(
        scene: Scene, tmp_path: Path) -> None:
    scene.deploy()
    for _ in range(3):
        scene.load(20.0)
        scene.tick()
    rows = [json.loads(r) for r in scene.autoscaler.decisions("chat", 2)]
    assert len(rows) == 2 and rows[0]["ts"] > rows[1]["ts"]
    assert {"inputs", "forecast", "capacity", "rule", "reason", "cold_start_s",
            "budget"} <= rows[0].keys()
    d = scene.world.engine.deployments["chat"]
    scene.world.engine.apply("chat", msgspec.structs.replace(d.spec, autoscale=AutoscaleSpec()))
    scene.world.step()
    assert scene.autoscaler.tick() == []
    assert "chat" not in scene.autoscaler.tracked


async def test_forecasters_and_learned_state_survive_a_checkpoint(scene: Scene,
                                                                  tmp_path: Path) -> None:
    scene.deploy()
    for rate in (20.0, 40.0, 60.0, 80.0):
        scene.load(rate, waiting=1)
        scene.tick()
    before = scene.autoscaler.tracked["chat"]
    path = tmp_path / "autoscale.pickle"
    scene.autoscaler.save(path)
    again = Autoscaler(scene.world.engine, DecisionStore(tmp_path / "controller.db"),
                       config=AutoscalerConfig(interval_s=1.0), clock=scene.world.clock)
    assert again.restore(path) == 1
    after = again.tracked["chat"]
    assert after.capacity == before.capacity and after.policy == before.policy
    assert after.forecaster.predict() == before.forecaster.predict()
    assert after.cold_starts == before.cold_starts


async def test_an_unreadable_checkpoint_starts_afresh(scene: Scene, tmp_path: Path) -> None:
    path = tmp_path / "autoscale.pickle"
    path.write_bytes(b"not a pickle")
    assert scene.autoscaler.restore(path) == 0
    assert scene.autoscaler.restore(tmp_path / "missing") == 0
