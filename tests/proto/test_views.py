"""The lighter telemetry view decodes what the full type decodes, minus histogram buckets."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings

from llm_ops_helper.proto import codec
from llm_ops_helper.proto.messages import Histogram, ReplicaSample, Telemetry
from llm_ops_helper.proto.views import ReplicaTotals, TelemetryTotals
from tests.proto import full_telemetry, structs


def test_views_have_every_field_default_and_order_of_their_message() -> None:
    for view, message, lighter in ((TelemetryTotals, Telemetry, {"replicas"}),
                                   (ReplicaTotals, ReplicaSample, {"histograms"})):
        mine, theirs = msgspec.structs.fields(view), msgspec.structs.fields(message)
        assert [f.name for f in mine] == [f.name for f in theirs]
        for a, b in zip(mine, theirs, strict=True):
            assert (a.default, a.default_factory) == (b.default, b.default_factory), a.name
            if a.name not in lighter:
                assert a.type == b.type, a.name


@settings(max_examples=50, deadline=None)
@given(structs(Telemetry))
def test_a_snapshot_reads_the_same_through_the_view_but_for_buckets(t: Telemetry) -> None:
    payload = codec.encode(t)
    full = codec.decode(payload, Telemetry)
    view = codec.decode(payload, TelemetryTotals)
    as_view = msgspec.json.decode(msgspec.json.encode(full), type=TelemetryTotals)
    assert view == as_view
    for replica, seen in zip(full.replicas, view.replicas, strict=True):  # type: ignore[attr-defined]
        assert {n: (h.sum, h.count) for n, h in replica.histograms.items()} == {
            n: (h.sum, h.count) for n, h in seen.histograms.items()}


@pytest.mark.parametrize(("payload", "reason"), [
    (b"{", "not_json"), (b'{"host": 1}', "schema"), (b'{"v": 7, "host": 1}', "unsupported_version")])
def test_the_view_rejects_with_the_same_reasons(payload: bytes, reason: str) -> None:
    with pytest.raises(codec.DecodeError) as caught:
        codec.decode(payload, TelemetryTotals)
    assert caught.value.reason == reason


def test_buckets_are_not_kept() -> None:
    h = Histogram(sum=3.0, count=2.0, buckets=[(0.1, 1.0), (1.0, 2.0)])
    r = ReplicaSample(name="r", runtime="vllm", up=True, histograms={"ttft_seconds": h})
    t = Telemetry(host="h", run_id="x", seq=1, ts=1.0, interval_s=1.0, replicas=[r])
    view = codec.decode(codec.encode(t), TelemetryTotals)
    totals = view.replicas[0].histograms["ttft_seconds"]  # type: ignore[attr-defined]
    assert (totals.sum, totals.count) == (3.0, 2.0) and not hasattr(totals, "buckets")


def test_a_full_snapshot_with_histograms_reads_the_same() -> None:
    t = full_telemetry()
    view = codec.decode(codec.encode(t), TelemetryTotals)
    assert [r.name for r in view.replicas] == [r.name for r in t.replicas]  # type: ignore[attr-defined]
    assert [g.temperature_c for g in view.gpus] == [g.temperature_c for g in t.gpus]  # type: ignore[attr-defined]
