"""The controller's anomaly glue: snapshots become series, detections come back explained."""

from __future__ import annotations

import math
import random
from pathlib import Path

import msgspec

from llm_ops_helper.controller.analytics.bank import DetectorBank
from llm_ops_helper.controller.anomalies import (
    GPU_SERIES,
    HOST_SERIES,
    REPLICA_SERIES,
    Analytics,
    SeriesInfo,
    snapshot_series,
    snapshot_values,
)
from llm_ops_helper.proto.messages import Histogram
from tests.controller.fixtures import gpu, replica, telemetry


def test_every_series_of_a_snapshot_is_named_in_order() -> None:
    t = telemetry(gpus=2, replicas=[replica("r0")])
    names = [(i.gpu, i.replica, i.name) for i in snapshot_series(t)]
    assert names == ([(0, None, n) for n in GPU_SERIES] + [(1, None, n) for n in GPU_SERIES]
                     + [(None, None, n) for n in HOST_SERIES]
                     + [(None, "r0", n) for n in REPLICA_SERIES])
    assert len(snapshot_values(t, None)) == len(names)


def test_values_use_deltas_for_counters_and_nan_for_what_is_not_known() -> None:
    before = telemetry(seq=1, gpus=[gpu(0, ecc_corrected_total=10)], replicas=[replica(
        "r0", requests_failed_total=1.0, requests_finished_total=100.0)])
    r0 = msgspec.structs.replace(
        replica("r0", requests_failed_total=2.0, requests_finished_total=103.0, requests_waiting=4.0),
        histograms={"ttft_seconds": Histogram(sum=5.8, count=104.0)})
    now = telemetry(seq=2, gpus=[gpu(0, ecc_corrected_total=13, throttle_reasons=[
        "hw_thermal_slowdown"])], replicas=[r0])
    values = dict(zip([(i.gpu, i.replica, i.name) for i in snapshot_series(now)],
                      snapshot_values(now, before), strict=True))
    assert values[(0, None, "ecc_corrected_rate")] == 3.0
    assert values[(0, None, "throttled")] == 1.0
    assert values[(0, None, "memory_used_pct")] == 25.0  # 20 of 80 GiB
    assert values[(None, None, "memory_used_pct")] == 37.5  # the host's 24 of 64 GiB
    assert values[(None, "r0", "requests_waiting")] == 4.0
    assert math.isclose(values[(None, "r0", "ttft_mean_s")], 0.8 / 4)
    assert math.isclose(values[(None, "r0", "error_rate")], 1 / 4)
    first = snapshot_values(before, None)
    assert math.isnan(first[4])  # no ECC rate without a previous count


def test_series_keys_round_trip_even_with_odd_replica_names() -> None:
    for info in (SeriesInfo("h1", 3, None, "power_w"), SeriesInfo("h1", None, "a|b", "ttft"),
                 SeriesInfo("h.x-1", None, None, "cpu_pct")):
        assert SeriesInfo.parse(info.key) == info


def run(analytics: Analytics, temps: list[float], start: float = 0.0):
    found = []
    for n, temp in enumerate(temps):
        analytics.add(telemetry(seq=n + 1, ts=start + n, gpus=[gpu(0, temperature_c=temp)]),
                      None)
        detections, holds = analytics.flush()
        found += [(n, d, h) for d, h in zip(detections, holds, strict=True)]
    return found


def test_a_temperature_jump_is_detected_and_explained(tmp_path: Path) -> None:
    rng = random.Random(7)
    analytics = Analytics(DetectorBank(), resolve_after_s=300.0)
    normal = [60 + rng.gauss(0, 0.5) for _ in range(300)]
    found = run(analytics, normal + [92.0] * 5)
    quiet = [f for f in found if f[0] < 300 and f[1].series == "temperature_c"]
    assert quiet == []
    hits = [f for f in found if f[1].series == "temperature_c"]
    assert hits and hits[0][0] == 300  # the first hot sample, before it is learned
    _, d, (condition, at, until) = hits[0]
    assert (d.host, d.gpu, d.value) == ("h1", 0, 92.0)
    assert 58 < d.expected < 62 and d.feature in DetectorBank.FEATURES
    assert d.summary.startswith(f"temperature_c on h1 GPU 0 is 92, expected about {d.expected:.4g}")
    assert f"driven by its {d.feature}" in d.summary
    assert condition.rule == "anomaly" and condition.series == "temperature_c"
    assert (at, until) == (300.0, 600.0)


def test_replica_series_are_silenced_during_start_up() -> None:
    silenced_calls = []

    def silenced(info: SeriesInfo, ts: float) -> bool:
        silenced_calls.append(info)
        return True

    analytics = Analytics(DetectorBank(), 300.0, silenced=silenced)
    rng = random.Random(3)
    for n in range(300):
        waiting = 2.0 + rng.random() if n < 299 else 500.0
        r = msgspec.structs.replace(replica("r0"), metrics={"requests_waiting": waiting})
        analytics.add(telemetry(seq=n + 1, ts=float(n), gpus=0, replicas=[r]), None)
        detections, _ = analytics.flush()
        assert all(d.replica is None for d in detections)
    assert any(i.replica == "r0" and i.name == "requests_waiting" for i in silenced_calls)


def test_detector_state_and_series_names_survive_a_checkpoint(tmp_path: Path) -> None:
    analytics = Analytics(DetectorBank(), 300.0)
    run(analytics, [50.0 + (n % 7) for n in range(100)])
    analytics.save(tmp_path / "d.npz")
    restored = Analytics(DetectorBank.load(tmp_path / "d.npz"), 300.0)
    assert restored.bank.keys() == analytics.bank.keys()
    assert restored.infos == analytics.infos
    a, b = run(analytics, [50.0, 99.0], 100), run(restored, [50.0, 99.0], 100)
    assert [(n, d.score) for n, d, _ in a] == [(n, d.score) for n, d, _ in b]


def test_a_young_series_does_not_alert_until_its_model_has_learned_enough() -> None:
    jump = [60.0] * 40 + [92.0]
    eager = Analytics(DetectorBank(), 300.0)
    patient = Analytics(DetectorBank(), 300.0, alert_after_samples=100)
    assert [n for n, d, _ in run(eager, jump) if d.series == "temperature_c"] == [40]
    assert run(patient, jump) == []
    assert patient.learning_detections >= 1
    rng = random.Random(5)
    # Past the detector's own refractory after that first (silent) detection, and grown up.
    later = run(patient, [60 + rng.gauss(0, 0.3) for _ in range(200)] + [92.0], start=41)
    assert [n for n, d, _ in later if d.series == "temperature_c"] == [200]


def test_a_forgotten_hosts_models_are_dropped_and_their_slots_reused(tmp_path: Path) -> None:
    analytics = Analytics(DetectorBank(), 300.0)
    analytics.add(telemetry(host="old", gpus=1), None)
    analytics.add(telemetry(host="keep", gpus=1), None)
    analytics.flush()
    before = len(analytics.bank)
    series = analytics.forget_host("old")
    assert series == len(GPU_SERIES) + len(HOST_SERIES)
    assert len(analytics.bank) == before - series
    assert all(i is None or i.host == "keep" for i in analytics.infos)
    analytics.save(tmp_path / "d.npz")  # holes survive a checkpoint
    restored = Analytics(DetectorBank.load(tmp_path / "d.npz"), 300.0)
    assert len(restored.bank) == len(analytics.bank)
    analytics.add(telemetry(host="new", gpus=1), None)
    analytics.flush()
    assert len(analytics.bank.keys()) == before  # the freed slots were reused, not appended
    # Reused slots start afresh: at most this one sample learned (a first ECC rate is NaN).
    assert max(analytics.bank.learned(analytics._layouts["new"][1]).tolist()) == 1


def test_scoring_in_steps_finds_what_one_batch_finds_in_the_same_order() -> None:
    """The daemon scores a big batch in steps (the loop serves requests between them): the
    steps take whole snapshots oldest first, and together score exactly what one batch would."""
    rng = random.Random(3)
    temps = [[60 + rng.gauss(0, 0.5) for _ in range(3)] for _ in range(200)] + [[95.0] * 3] * 3

    def feed(analytics: Analytics) -> None:
        for n, row in enumerate(temps):
            analytics.add(telemetry(seq=n + 1, ts=float(n),
                                    gpus=[gpu(i, temperature_c=t) for i, t in enumerate(row)]),
                          None)

    whole = Analytics(DetectorBank(), resolve_after_s=300.0)
    stepped = Analytics(DetectorBank(), resolve_after_s=300.0)
    feed(whole)
    feed(stepped)
    assert stepped.pending == whole.pending > 1000
    expected, _ = whole.flush()
    per_snapshot = stepped.pending // len(temps)
    found = []
    while stepped.pending:
        before = stepped.pending
        detections, _ = stepped.flush(limit=100)
        taken = before - stepped.pending
        assert taken % per_snapshot == 0 and 0 < taken < 100 + per_snapshot  # whole snapshots
        found += detections
    assert [(d.ts, d.gpu, d.series, d.score) for d in found] == [
        (d.ts, d.gpu, d.series, d.score) for d in expected]
    assert any(d.series == "temperature_c" for d in found)
