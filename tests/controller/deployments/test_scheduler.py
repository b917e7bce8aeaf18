from __future__ import annotations

import random
from collections import Counter

import msgspec
import pytest

from llm_ops_helper.controller.deployments.scheduler import (
    GpuView,
    HostView,
    Placement,
    PlacementRequest,
    Reservation,
    feasible,
    gib,
    host_view,
    pick_victims,
    place,
)
from llm_ops_helper.controller.fleet import Fleet
from llm_ops_helper.proto.messages import Alert, GpuInfo
from tests.controller.fixtures import gpu, status, telemetry

GIB = 1 << 30


def host(name: str, *free_gib: float | None, total_gib: float = 80, online: bool = True,
         runtimes: tuple[str, ...] = ("vllm", "sim"), unhealthy: str | None = None,
         critical: dict[int, str] | None = None, sick_gpus: tuple[int, ...] = ()) -> HostView:
    gpus = tuple(GpuView(i, f"GPU-{name}-{i}", "NVIDIA H100", int(total_gib * GIB),
                         None if f is None else int(f * GIB), i not in sick_gpus,
                         (critical or {}).get(i))
                 for i, f in enumerate(free_gib))
    return HostView(name, online, runtimes, gpus, unhealthy)


def req(gpu_gib: float = 40, count: int = 1, gpus: int = 1, runtime: str = "vllm",
        deployment: str = "llama") -> PlacementRequest:
    return PlacementRequest(deployment, runtime, gpus, int(gpu_gib * GIB), count)


def where(p: Placement) -> list[tuple[str, tuple[int, ...]]]:
    return [(x.host, x.gpus) for x in p.placed]


@pytest.mark.parametrize(("n", "text"), [
    (0, "0.0 GiB"), (GIB, "1.0 GiB"), (24 * GIB, "24.0 GiB"), (int(1.25 * GIB), "1.2 GiB"),
    (80 * GIB - 1, "80.0 GiB"), (GIB // 10 * 15, "1.5 GiB"),
])
def test_memory_reads_as_gib_with_one_decimal(n: int, text: str) -> None:
    assert gib(n) == text


def test_a_placement_says_where_what_was_free_and_why_this_host() -> None:
    p = place(req(40), [host("gpu-01", 80, 30)])
    assert p.refused is None
    [placed] = p.placed
    assert (placed.host, placed.gpus) == ("gpu-01", (0,))
    assert placed.why == ("gpu-01: GPU 0 (80.0 GiB free of 80.0 GiB), best fit for 40.0 GiB; "
                          "0 replicas of llama there before, the fewest of 1 host that fit")


def test_the_refusal_names_the_largest_free_gpu_and_where() -> None:
    hosts = [host("gpu-03", 10, 12), host("gpu-07", 8, 24), host("gpu-09", 20)]
    p = place(req(40), hosts)
    assert p.placed == ()
    assert p.refused == ("1 of 1 replica of llama not placed: no host has 40.0 GiB free on one "
                         "GPU; largest free is 24.0 GiB on gpu-07 GPU 1")


def test_the_refusal_lists_every_host_and_gpu_left_out_and_why() -> None:
    hosts = [
        host("a", 24, critical={1: "open alert gpu_xid: XID 79 on GPU 1"}),
        host("b", 80, online=False),
        host("c", 80, unhealthy="agent supervisor disabled"),
        host("d", 80, runtimes=("llamacpp", "sim")),
        host("e", 80, runtimes=()),
        host("f", 10, 80, sick_gpus=(1,)),
    ]
    hosts[0] = HostView("a", True, ("vllm",), (*hosts[0].gpus, GpuView(
        1, memory_total_bytes=80 * GIB, memory_free_bytes=80 * GIB,
        critical="open alert gpu_xid: XID 79 on GPU 1")))
    p = place(req(40, count=2), hosts)
    assert p.placed == ()
    assert p.refused == (
        "2 of 2 replicas of llama not placed: no host has 40.0 GiB free on one GPU; "
        "largest free is 24.0 GiB on a GPU 0; offline: b; "
        "unhealthy: c (agent supervisor disabled); "
        "without runtime vllm: d (has llamacpp, sim), e (has none); "
        "GPUs excluded: a GPU 1 (open alert gpu_xid: XID 79 on GPU 1), f GPU 1 (unhealthy)")


def test_a_gpu_with_an_open_critical_alert_is_never_used() -> None:
    alert = "open alert gpu_ecc_uncorrected: GPU 0 has 3 uncorrected ECC error(s)"
    hosts = [host("a", 80, 41, critical={0: alert})]
    assert where(place(req(40), hosts)) == [("a", (1,))]
    # The same host when only the bad GPU has room: refused, naming the alert.
    p = place(req(60), hosts)
    assert p.placed == ()
    assert p.refused is not None
    assert f"GPUs excluded: a GPU 0 ({alert})" in p.refused
    assert "largest free is 41.0 GiB on a GPU 1" in p.refused


@pytest.mark.parametrize(("hosts", "reason"), [
    ([], "no hosts are known"),
    ([host("a", 80, online=False)], "no online, healthy host offers runtime vllm; offline: a"),
    ([host("a", 80, unhealthy="disk full")],
     "no online, healthy host offers runtime vllm; unhealthy: a (disk full)"),
    ([host("a", 80, runtimes=("sim",))],
     "no online, healthy host offers runtime vllm; without runtime vllm: a (has sim)"),
])
def test_no_eligible_host_says_which_and_why(hosts: list[HostView], reason: str) -> None:
    p = place(req(1), hosts)
    assert p.placed == ()
    assert p.refused == f"1 of 1 replica of llama not placed: {reason}"


@pytest.mark.parametrize(("reservations", "expected"), [
    ([], ("a", (0,))),  # 50 GiB free on GPU 0: the tightest fit
    ([Reservation("a", (0,), 20 * GIB)], ("a", (1,))),  # 30 left on GPU 0: too little
    ([Reservation("a", (0, 1), 20 * GIB)], ("a", (1,))),  # 30 and 40 left: exactly 40 fits
    ([Reservation("a", (0, 1), 25 * GIB)], ("b", (0,))),  # 25 and 35 left: b's 45 it is
    ([Reservation("b", (0,), 70 * GIB)], ("a", (0,))),  # another host's: no effect on a
])
def test_reservations_of_starting_replicas_come_off_free_memory(
        reservations: list[Reservation], expected: tuple[str, tuple[int, ...]]) -> None:
    hosts = [host("a", 50, 60), host("b", 45)]
    p = place(req(40), hosts, reservations, {"a": 0, "b": 1})
    assert where(p) == [expected]


def test_reservations_sum_on_one_gpu_and_never_go_below_zero() -> None:
    hosts = [host("a", 30)]
    two = [Reservation("a", (0,), 10 * GIB), Reservation("a", (0,), 15 * GIB)]
    assert place(req(5), hosts, two).placed[0].why.startswith("a: GPU 0 (5.0 GiB free of")
    p = place(req(5), hosts, [Reservation("a", (0,), 50 * GIB)])
    assert p.refused is not None and "largest free is 0.0 GiB on a GPU 0" in p.refused


def test_several_replicas_in_one_call_count_the_memory_of_the_ones_just_placed() -> None:
    p = place(req(30, count=3), [host("a", 80)])
    assert where(p) == [("a", (0,)), ("a", (0,))]
    assert p.placed[1].why.startswith("a: GPU 0 (50.0 GiB free of 80.0 GiB)")
    assert p.refused == ("1 of 3 replicas of llama not placed: no host has 30.0 GiB free on one "
                         "GPU; largest free is 20.0 GiB on a GPU 0")


def test_twenty_replicas_spread_evenly_over_four_hosts() -> None:
    hosts = [host(f"gpu-{i:02d}", *([80] * 8)) for i in range(1, 5)]
    p = place(req(30, count=20), hosts)
    assert p.refused is None
    per_host = Counter(x.host for x in p.placed)
    assert per_host == {h.host: 5 for h in hosts}
    # Round robin, each replica to the host with the fewest so far.
    assert [x.host for x in p.placed[:8]] == [h.host for h in hosts] * 2
    # Within a host, best fit: two 30 GiB replicas share a GPU before a third opens a new one.
    assert [x.gpus for x in p.placed if x.host == "gpu-01"] == [(0,), (0,), (1,), (1,), (2,)]


def test_spreading_counts_the_replicas_already_there() -> None:
    hosts = [host(h, 80, 80, 80, 80) for h in ("a", "b", "c")]
    p = place(req(10, count=4), hosts, existing_per_host={"a": 3, "b": 1})
    # c catches up with b, then they alternate; a, already holding 3, gets none.
    assert [x.host for x in p.placed] == ["c", "b", "c", "b"]
    assert p.placed[1].why.endswith("1 replica of llama there before, the fewest of 3 hosts "
                                    "that fit; most free GPU memory (320.0 GiB) of the 2 tied")


def test_spreading_gives_way_when_only_one_host_has_room() -> None:
    p = place(req(40, count=3), [host("a", 80, 80), host("b", 50)])
    assert [x.host for x in p.placed] == ["a", "b", "a"]
    assert p.placed[2].why.endswith("1 replica of llama there before, the fewest of 1 host "
                                    "that fit")


def test_among_hosts_tied_on_spread_the_one_with_most_free_memory_wins() -> None:
    p = place(req(10), [host("a", 20, 20), host("b", 70), host("c", 10, 10)])
    [placed] = p.placed
    assert placed.host == "b"
    assert placed.why == ("b: GPU 0 (70.0 GiB free of 80.0 GiB), best fit for 10.0 GiB; "
                          "0 replicas of llama there before, the fewest of 3 hosts that fit; "
                          "most free GPU memory (70.0 GiB) of the 3 tied")


@pytest.mark.parametrize(("free", "need", "chosen"), [
    ((80, 45, 60), 40, (1,)),  # tightest that fits
    ((80, 39, 60), 40, (2,)),  # 39 does not fit
    ((50, 50, 80), 40, (0,)),  # equal: lower index
    ((80, 45, 60), 0, (0,)),  # no size stated: most room
])
def test_within_a_host_the_tightest_gpu_that_fits(free: tuple[int, ...], need: int,
                                                  chosen: tuple[int, ...]) -> None:
    assert where(place(req(need), [host("a", *free)])) == [("a", chosen)]


def test_a_multi_gpu_replica_takes_its_gpus_on_one_host() -> None:
    hosts = [host("a", 80, 20, 50, 45), host("b", 80)]
    p = place(req(40, gpus=2), hosts)
    assert where(p) == [("a", (3, 2))]
    assert p.placed[0].why == (
        "a: GPU 3 (45.0 GiB free of 80.0 GiB), GPU 2 (50.0 GiB free of 80.0 GiB), "
        "best fit for 40.0 GiB each; 0 replicas of llama there before, the fewest of 1 host "
        "that fit")


def test_a_multi_gpu_replica_is_never_split_across_hosts() -> None:
    p = place(req(40, gpus=2), [host("a", 80, 20), host("b", 70, 30)])
    assert p.placed == ()
    assert p.refused == ("1 of 1 replica of llama not placed: no host has 2 GPUs with 40.0 GiB "
                         "free each; the most is 1 on a; largest free is 80.0 GiB on a GPU 0")


def test_cpu_only_replicas_spread_over_hosts_with_the_runtime() -> None:
    hosts = [host("c"), host("a", runtimes=("vllm",)), host("b")]
    p = place(req(0, count=3, gpus=0, runtime="sim", deployment="tiny"), hosts)
    assert where(p) == [("b", ()), ("c", ()), ("b", ())]
    assert p.placed[0].why == ("b: CPU only (runtime sim); 0 replicas of tiny there before, "
                               "the fewest of 2 hosts that fit; first by name of the 2 tied")


def test_unknown_free_memory_blocks_a_sized_request_only() -> None:
    hosts = [host("a", None)]
    p = place(req(10), hosts)
    assert p.refused == ("1 of 1 replica of llama not placed: no host has 10.0 GiB free on one "
                         "GPU; no usable GPU with known free memory; "
                         "free memory unknown: a GPU 0")
    placed = place(req(0), hosts).placed
    assert placed[0].why == ("a: GPU 0 (free memory unknown, 80.0 GiB total), fewest replicas "
                             "starting then most free (no GPU memory requested); 0 replicas of "
                             "llama there before, the fewest of 1 host that fit")


def test_unsized_replicas_go_to_gpus_with_the_fewest_starting_then_most_free() -> None:
    # Their memory is not reserved (it is not known), so count them instead of piling them up.
    p = place(req(0, count=4), [host("a", 80, 70, 75)], [Reservation("a", (2,), 0)])
    assert [x.gpus for x in p.placed] == [(0,), (1,), (0,), (2,)]


def test_an_unsized_request_needs_only_enough_usable_gpus() -> None:
    p = place(req(0, gpus=3), [host("a", 1, 1, critical={1: "open alert gpu_xid: XID 48"})])
    assert p.refused == ("1 of 1 replica of llama not placed: no host has 3 usable GPUs; the "
                         "most is 1 on a; GPUs excluded: a GPU 1 (open alert gpu_xid: XID 48)")


def test_placement_is_deterministic_whatever_the_order_of_hosts() -> None:
    hosts = [host(f"h{i}", *([80, 40, 20][: 1 + i % 3]), online=i % 5 != 0) for i in range(12)]
    first = place(req(20, count=15), hosts, [Reservation("h1", (0,), 30 * GIB)], {"h2": 1})
    rng = random.Random(7)
    for _ in range(5):
        shuffled = hosts[:]
        rng.shuffle(shuffled)
        again = place(req(20, count=15), shuffled, [Reservation("h1", (0,), 30 * GIB)],
                      {"h2": 1})
        assert again == first


def test_nothing_asked_nothing_placed_and_nonsense_is_rejected() -> None:
    assert place(req(40, count=0), [host("a", 80)]) == Placement((), None)
    with pytest.raises(ValueError, match="count must be >= 0, got -1"):
        req(count=-1)
    with pytest.raises(ValueError, match="gpus_per_replica must be >= 0"):
        req(gpus=-2)


@pytest.mark.parametrize(("request_", "hosts", "reason"), [
    (req(40), [host("a", 0, 0)], None),  # full now, but could hold one some day
    (req(40), [host("a", 0, critical={0: "xid"})], None),  # alerts pass; hardware does not
    (req(40), [host("a", 80, unhealthy="x")], None),
    (req(0, gpus=0, runtime="sim"), [host("a")], None),
    (req(100), [host("a", None, total_gib=80), host("b", 0, 0, total_gib=94)],
     "no online host with runtime vllm has a GPU of 100.0 GiB or more; the largest is 94.0 GiB "
     "on b GPU 0"),
    (req(40, gpus=4), [host("a", 80, 80), host("b", 80, 80, 80)],
     "no online host with runtime vllm has 4 GPUs of 40.0 GiB or more; the most is 3 on b; "
     "the largest is 80.0 GiB on a GPU 0"),
    (req(0, gpus=2), [host("a", 80), host("b")],
     "no online host with runtime vllm has 2 GPUs; the most is 1 on a"),
    (req(10), [host("a")], "no online host with runtime vllm has a GPU of 10.0 GiB or more; "
     "no host reports a GPU"),
    (req(40, runtime="trt"), [host("a", 80), host("b", 80, runtimes=("llamacpp",))],
     "no online host offers runtime trt (offered: llamacpp, sim, vllm)"),
    (req(40), [host("a", 80, online=False)], "no host is online"),
    (req(40), [host("a", 20, total_gib=20), host("b", 80, online=False)],
     "no online host with runtime vllm has a GPU of 40.0 GiB or more; the largest is 20.0 GiB "
     "on a GPU 0"),
])
def test_feasible_rejects_only_what_could_never_fit(request_: PlacementRequest,
                                                    hosts: list[HostView],
                                                    reason: str | None) -> None:
    assert feasible(request_, hosts) == reason


def test_a_gpu_of_unknown_size_gets_the_benefit_of_the_doubt() -> None:
    unsized = HostView("a", True, ("vllm",), (GpuView(0),))
    assert feasible(req(500), [unsized]) is None


R = tuple[str, str, str, float]


@pytest.mark.parametrize(("replicas", "count", "victims"), [
    # Not ready first, failed before pending before starting, whatever their hosts.
    ([("r1", "a", "ready", 1.0), ("r2", "a", "starting", 2.0), ("r3", "b", "failed", 0.5),
      ("r4", "b", "pending", 0.1)], 3, ["r3", "r4", "r2"]),
    # All ready: the host with the most first, re-counted after each pick.
    ([("a1", "a", "ready", 1.0), ("a2", "a", "ready", 2.0), ("a3", "a", "ready", 3.0),
      ("b1", "b", "ready", 4.0), ("b2", "b", "ready", 5.0)], 3, ["a3", "b2", "a2"]),
    # Same count on each host: the newest.
    ([("x", "a", "ready", 1.0), ("y", "b", "ready", 9.0), ("z", "c", "ready", 5.0)], 2,
     ["y", "z"]),
    # Asked for more than there are: all of them, in order.
    ([("x", "a", "ready", 1.0), ("y", "a", "starting", 9.0)], 5, ["y", "x"]),
    ([("x", "a", "ready", 1.0)], 0, []),
])
def test_scale_down_picks_not_ready_then_crowded_hosts_then_newest(
        replicas: list[R], count: int, victims: list[str]) -> None:
    assert pick_victims(replicas, count) == victims
    assert pick_victims(list(reversed(replicas)), count) == victims


def test_scale_down_uses_the_given_per_host_counts() -> None:
    replicas = [("a1", "a", "ready", 1.0), ("b1", "b", "ready", 0.0)]
    # b also holds replicas not offered as victims (draining ones, say): it is the crowded one.
    assert pick_victims(replicas, 1, {"a": 1, "b": 3}) == ["b1"]
    assert pick_victims(replicas, 1) == ["a1"]


def firing(rule: str, host: str, gpu_: int | None, summary: str,
           state: str = "firing") -> Alert:
    return Alert(id=f"{rule}{gpu_}", key=f"{rule}|{host}|{gpu_}", state=state,  # type: ignore[arg-type]
                 severity="critical", rule=rule, host=host, gpu=gpu_, summary=summary, ts=1.0)


def test_host_view_reads_free_memory_runtimes_and_critical_alerts_from_the_fleet() -> None:
    fleet = Fleet()
    fleet.apply_status(msgspec.structs.replace(status("h1"), runtimes=["vllm", "sim"]), 0.0, 0.0)
    fleet.apply_telemetry(telemetry("h1", gpus=[gpu(0), gpu(1, memory_used_bytes=70 * GIB),
                                                gpu(2, healthy=False)]), 0.0, 0.0)
    alerts = [
        firing("gpu_xid", "h1", 1, "XID 79 on GPU 1"),
        firing("gpu_ecc_uncorrected", "h1", 0, "old", state="resolved"),  # over
        firing("gpu_xid", "h2", 0, "another host"),
        firing("gpu_temperature_high", "h1", 0, "hot, but usable"),  # not critical
    ]
    view = host_view(fleet.hosts["h1"], alerts)
    assert (view.host, view.online, view.runtimes, view.unhealthy) == ("h1", True,
                                                                       ("vllm", "sim"), None)
    assert [(g.index, g.memory_free_bytes, g.healthy, g.critical) for g in view.gpus] == [
        (0, 60 * GIB, True, None),
        (1, 10 * GIB, True, "open alert gpu_xid: XID 79 on GPU 1"),
        (2, None, False, None),
    ]
    assert view.gpus[0].memory_total_bytes == 80 * GIB


def test_a_critical_alert_without_a_gpu_bars_every_gpu_of_its_host() -> None:
    fleet = Fleet()
    fleet.apply_telemetry(telemetry("h1", gpus=2), 0.0, 0.0)
    view = host_view(fleet.hosts["h1"], [firing("gpu_xid", "h1", None, "XID 79 on a GPU")])
    assert [g.critical for g in view.gpus] == ["open alert gpu_xid: XID 79 on a GPU"] * 2
    assert view.runtimes == ()  # no retained status: no runtime known, nothing goes there


def test_before_telemetry_a_host_shows_its_inventory_with_free_memory_unknown() -> None:
    fleet = Fleet()
    inventory = [GpuInfo(index=1, uuid="GPU-b", name="H100", memory_total_bytes=80 * GIB),
                 GpuInfo(index=0, uuid="GPU-a", name="H100")]
    fleet.apply_status(msgspec.structs.replace(status("h1"), gpus=inventory, runtimes=["vllm"]),
                       0.0, 0.0)
    view = host_view(fleet.hosts["h1"], [])
    assert view.gpus == (GpuView(0, "GPU-a", "H100", None, None),
                         GpuView(1, "GPU-b", "H100", 80 * GIB, None))
    p = place(req(10), [view])
    assert p.refused is not None and "free memory unknown: h1 GPU 0, h1 GPU 1" in p.refused
