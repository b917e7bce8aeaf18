"""The phases of bench/ingest.py: a drain of a backlog, and a fleet held at its steady rate.

Both run the publisher (bench/ingest_publisher.py) as a process of its own, replaying a workload's
recorded snapshots, and time a consumer (bench/ingest_consumers.py) from its samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import psutil
from agent_overhead import cpu_s, peak_rss_mb
from ingest_consumers import BenchError, Consumer, Sample, log_gist

from llm_ops_helper.broker import LocalMosquitto
from llm_ops_helper.proto import codec
from llm_ops_helper.proto.messages import Telemetry
from llm_ops_helper.proto.topics import TopicKind, agent_topic, all_agents

PUBLISHER = Path(__file__).resolve().parent / "ingest_publisher.py"
# "No growing lag": the least-squares slope of the lag over the hold stays under this (0.01 s
# per s is 0.6 s gained in a minute), and the lag at the end stays under this many intervals.
LAG_SLOPE_MAX = 0.01
LAG_END_MAX_INTERVALS = 2.0
STALL_S = 20.0  # a consumer that handles nothing new for this long has stalled


async def publish(broker: LocalMosquitto, data: Path, hosts: int, rounds: int, interval: float,
                  *, seq_start: int = 1,
                  watch: Callable[[], None] | None = None) -> dict[str, Any]:
    """Runs the publisher process to its end; ``watch`` is called every 0.5 s meanwhile."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(PUBLISHER), "--port", str(broker.port), "--hosts", str(hosts),
        "--rounds", str(rounds), "--interval", str(interval), "--seq-start", str(seq_start),
        "--data", str(data),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    communicate = asyncio.ensure_future(child.communicate())
    while not communicate.done():
        if watch is not None:
            watch()
        await asyncio.wait({communicate}, timeout=0.5)
    out, err = communicate.result()
    if child.returncode != 0:
        raise BenchError(f"publisher exited with {child.returncode}: {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    if result["acked"] != result["published"]:
        raise BenchError(f"publisher: the broker acknowledged {result['acked']} of "
                         f"{result['published']} messages ({result['failed']} refused)")
    return result


async def probe(broker: LocalMosquitto, consumer: Consumer, data: Path,
                timeout_s: float = 30.0) -> None:
    """Telemetry from host ``bench-probe`` once a second until the consumer counts one: its
    subscription is live (what is published before it subscribes is lost, not queued)."""
    with gzip.open(data, "rb") as f:
        snapshot = codec.decode(f.readline(), Telemetry)
    deadline = time.monotonic() + timeout_s
    async with aiomqtt.Client(broker.host, broker.port,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        for seq in itertools.count(1):
            message = msgspec.structs.replace(snapshot, host="bench-probe", seq=seq,
                                              run_id="bench-probe", ts=time.time())
            await client.publish(agent_topic("bench-probe", TopicKind.TELEMETRY),
                                 codec.encode(message), qos=1)
            for _ in range(10):
                await asyncio.sleep(0.1)
                if (await consumer.sample()).handled >= 1:
                    await asyncio.sleep(0.5)  # a probe still on its way arrives now
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"{consumer.name}: counted none of {seq} probe messages in "
                                 f"{timeout_s} s (not subscribed to "
                                 f"{all_agents(TopicKind.TELEMETRY)}?)")


def reconnects(broker: LocalMosquitto, consumer: Consumer, since: float) -> str:
    """What the broker's log says about the consumer's connections since ``since``."""
    ident = getattr(consumer, "identifier", "llmops-controller")
    lines = broker.log_path.read_text(errors="replace").splitlines()
    wall_since = time.time() - (time.monotonic() - since)
    connects = [line for line in lines if f" as {ident} " in line
                and float(line.split(":", 1)[0]) >= wall_since - 1]
    if len(connects) <= 1:
        return "the broker saw no reconnection"
    return (f"it reconnected {len(connects) - 1} time(s) meanwhile (messages acknowledged to "
            f"the broker but not yet handled are lost with the old connection)")


def broker_process() -> psutil.Process:
    found = [p for p in psutil.Process().children() if p.name() == "mosquitto"]
    if len(found) != 1:
        raise BenchError(f"expected one mosquitto child process, found {len(found)}")
    return found[0]


def crossing(samples: list[Sample], target: float) -> tuple[float, float]:
    """Time and CPU, interpolated, at which ``messages`` first reached ``target``."""
    for a, b in itertools.pairwise(samples):
        if b.messages >= target:
            if b.messages == a.messages:
                return b.t, b.cpu
            f = (target - a.messages) / (b.messages - a.messages)
            return a.t + f * (b.t - a.t), a.cpu + f * (b.cpu - a.cpu)
    raise BenchError(f"never reached {target:.0f} messages")


async def stopped_on_error(consumer: Consumer, phase: Any) -> dict[str, Any]:
    """Awaits ``phase``; where it fails, stops the consumer before the error goes on."""
    try:
        result: dict[str, Any] = await phase
    except BaseException:
        with contextlib.suppress(BenchError):
            await consumer.stop()
        raise
    return result


async def drain(broker: LocalMosquitto, consumer: Consumer, data: Path, hosts: int, rounds: int,
                poll_s: float) -> dict[str, Any]:
    await consumer.start()
    await probe(broker, consumer, data)
    await consumer.stop()  # the broker now holds its session and queues for it
    pub = await publish(broker, data, hosts, rounds, 0.0)
    backlog = pub["acked"]
    mosq = broker_process()
    await consumer.start()
    t_start = time.monotonic()
    mosq_cpu0 = cpu_s(mosq)
    samples = [await consumer.sample()]
    lost_note = None
    while samples[-1].handled < backlog:
        await asyncio.sleep(poll_s)
        samples.append(await consumer.sample())
        last_progress = next(s for s in samples if s.handled == samples[-1].handled)
        if samples[-1].t - last_progress.t > STALL_S:
            # Timed on what it did handle; the rest is reported lost, with what the broker saw.
            lost_note = (f"stalled at {samples[-1].handled:.0f} of {backlog} for {STALL_S:.0f} s; "
                         f"{reconnects(broker, consumer, t_start)}; {log_gist(consumer.log)}")
            samples = samples[:samples.index(last_progress) + 1]
            break
    done = samples[-1]
    mosq_cpu = cpu_s(mosq) - mosq_cpu0
    backlog_accepted = min(done.messages, backlog)  # where some were dropped: what it took
    if samples[0].messages >= 0.1 * backlog_accepted:
        raise BenchError(f"{consumer.name} had {samples[0].messages:.0f} messages at its first "
                         f"sample: a backlog of {backlog} is too small to time; raise --backlog")
    t10, c10 = crossing(samples, 0.1 * backlog_accepted)
    t90, c90 = crossing(samples, 0.9 * backlog_accepted)
    n = 0.8 * backlog_accepted
    first = next(s for s in samples if s.messages > 0)
    result: dict[str, Any] = {
        "backlog": backlog,
        "handled": int(done.handled),
        "accepted": int(done.messages),
        "lost": backlog - int(done.handled),
        "lost_note": lost_note,
        "rate_msgs_per_s": round(n / (t90 - t10)),
        "cpu_us_per_msg": round(1e6 * (c90 - c10) / n, 1),
        "cpu_cores_busy": round((c90 - c10) / (t90 - t10), 2),
        "drain_wall_s": round(done.t - first.t, 2),
        "start_to_first_message_s": round(first.t - t_start, 2),
        "broker_cpu_cores_busy": round(mosq_cpu / (done.t - t_start), 2),
        "samples": len(samples),
        "peak_rss_mb": round(peak_rss_mb(consumer.process.pid), 1) if consumer.process else None,
        "publisher": pub,
    }
    if done.metrics:
        result["drops"] = done.metrics["drops"]
        result["seq_missing"] = done.metrics["seq_missing"]
        # Analytics may score in batches behind ingest: wait until its count stops rising.
        settle = [done]
        while True:
            await asyncio.sleep(1.0)
            settle.append(await consumer.sample())
            if settle[-1].metrics["analytics_samples"] == settle[-2].metrics["analytics_samples"]:
                break
            if settle[-1].t - done.t > 120:
                raise BenchError("controller: analytics samples still rising 120 s after ingest")
        samples_total = settle[-1].metrics["analytics_samples"]
        result["analytics_samples_total"] = int(samples_total)
        result["analytics_caught_up_after_ingest_s"] = round(settle[-2].t - done.t, 1)
        result["analytics_samples_per_msg"] = round(samples_total / max(1, done.messages), 1)
        result.update(alert_counts(samples[0], settle[-1]))
        # /metrics walks every GPU of the fleet in the event loop. Round trips, which include
        # waiting behind the work queued ahead of the request: not what a scrape costs.
        took = [s.scrape_s for s in samples[1:]]
        result["poll_s"] = poll_s
        result["metrics_round_trip_ms_mean"] = round(1000 * sum(took) / max(1, len(took)), 1)
    await consumer.stop()
    return result


def alert_counts(before: Sample, after: Sample) -> dict[str, Any]:
    """Alerts fired and anomalies detected between two of the controller's samples, and the
    alerts firing at the second, by severity (None where its /metrics has no such series)."""
    def delta(name: str) -> int | None:
        a, b = before.metrics.get(name), after.metrics.get(name)
        return None if a is None or b is None else int(b - a)

    return {"alerts_fired": delta("alerts_fired"),
            "anomalies_detected": delta("anomalies_detected"),
            "alerts_firing_at_end": {k: int(v) for k, v in
                                     after.metrics.get("alerts_firing", {}).items()}}


def slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


async def hold(broker: LocalMosquitto, consumer: Consumer, data: Path, hosts: int, seconds: int,
               sample_s: float) -> dict[str, Any]:
    interval = 1.0
    await consumer.start()
    await probe(broker, consumer, data)
    base = await consumer.sample()
    samples: list[Sample] = []
    errors: list[BaseException] = []

    async def sampler() -> None:
        try:
            while True:
                samples.append(await consumer.sample())
                await asyncio.sleep(sample_s)
        except BenchError as exc:
            errors.append(exc)

    def watch() -> None:
        if errors:
            raise errors[0]

    task = asyncio.create_task(sampler())
    t0 = time.monotonic()
    try:
        pub = await publish(broker, data, hosts, seconds, interval, watch=watch)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    watch()
    t1 = time.monotonic()
    window = [s for s in samples if t0 <= s.t <= t1]
    expected = base.handled + pub["acked"]
    # Let it work off what it fell behind by; what it never handles after a stall is lost.
    final = progress = await consumer.sample()
    deadline = time.monotonic() + 180
    while final.handled < expected and time.monotonic() < deadline:
        await asyncio.sleep(max(1.0, sample_s / 2))
        final = await consumer.sample()
        if final.handled > progress.handled:
            progress = final
        elif final.t - progress.t > STALL_S:
            break
    catch_up_s = final.t - t1
    first, last = window[0], window[-1]
    wall = last.t - first.t
    received = final.messages - base.messages
    result: dict[str, Any] = {
        "hosts": hosts, "interval_s": interval, "seconds": seconds,
        "published": pub["acked"],
        "received_or_accepted": int(received),
        "lost": int(expected - final.handled),
        "lost_note": None if final.handled >= expected else (
            f"stalled {STALL_S:.0f} s short of the count; "
            f"{reconnects(broker, consumer, t0)}; {log_gist(consumer.log)}"
            if final.t - progress.t > STALL_S else "still working off its backlog after 180 s"),
        "caught_up_after_publisher_s": round(catch_up_s, 1),
        "rate_in_msgs_per_s": round((last.messages - first.messages) / wall),
        "cpu_pct_of_one_core": round(100 * (last.cpu - first.cpu) / wall, 1),
        "cpu_us_per_msg": round(1e6 * (last.cpu - first.cpu)
                                / max(1.0, last.messages - first.messages), 1),
        "peak_rss_mb": round(peak_rss_mb(consumer.process.pid), 1) if consumer.process else None,
        "publisher": pub,
    }
    passed = result["lost"] == 0
    if final.metrics:
        # Lag from after the first tenth of the hold (start-up), to the end of publishing.
        steady = [s for s in window if s.t >= first.t + 0.1 * wall] or window
        lag = [(round(s.t - t0, 1), round(s.metrics["lag_s"], 3)) for s in window]
        lag_fit = [(s.t - t0, s.metrics["lag_s"]) for s in steady
                   if math.isfinite(s.metrics["lag_s"])]
        start_lag = sum(y for _, y in lag_fit[:3]) / max(1, len(lag_fit[:3]))
        end_lag = sum(y for _, y in lag_fit[-3:]) / max(1, len(lag_fit[-3:]))
        drops = {k: int(v - base.metrics["drops"].get(k, 0))
                 for k, v in final.metrics["drops"].items()}
        result.update({
            "accepted": int(received),
            "dropped": {k: v for k, v in drops.items() if v},
            "seq_missing": int(final.metrics["seq_missing"] - base.metrics["seq_missing"]),
            "lag_start_s": round(start_lag, 3),
            "lag_end_s": round(end_lag, 3),
            "lag_slope_s_per_s": round(slope(lag_fit), 5),
            "lag_samples": lag,
            "rss_mb_start_end": [round(first.metrics["rss_mb"], 1),
                                 round(last.metrics["rss_mb"], 1)],
            # Round trips of the bench's scrapes: the page grows with the fleet (GPU gauges).
            "sample_s": sample_s,
            "metrics_round_trip_ms_mean": round(1000 * sum(s.scrape_s for s in window)
                                                / len(window), 1),
            "analytics_samples_per_s": round(
                (last.metrics["analytics_samples"] - first.metrics["analytics_samples"]) / wall),
            **alert_counts(base, final),
        })
        no_loss = (result["lost"] == 0 and result["accepted"] == result["published"]
                   and result["seq_missing"] == 0 and not result["dropped"])
        lag_ok = (result["lag_slope_s_per_s"] <= LAG_SLOPE_MAX
                  and end_lag <= LAG_END_MAX_INTERVALS * interval)
        result["no_loss"], result["lag_not_growing"] = no_loss, lag_ok
        passed = no_loss and lag_ok
    result["publisher_kept_schedule"] = pub["late_max_s"] < interval
    result["pass"] = passed
    await consumer.stop()
    return result
