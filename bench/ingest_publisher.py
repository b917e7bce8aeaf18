"""A fleet of agents in one cheap process: recorded snapshots replayed for N hosts over paho-mqtt.

Host ``bench-0000`` .. publishes ``rounds`` snapshots on its telemetry topic at QoS 1 (what agents
use), each with its host, a run_id of its own, seq rising by 1 from ``--seq-start`` and ts = now.
With ``--interval`` > 0 each host sends once per interval, hosts spread evenly over it (a fleet at
its steady rate); with ``--interval 0`` everything goes as fast as the broker acknowledges it (a
backlog for a disconnected subscriber's session).

Per message the work is a bytes format of the four fields in front of a pre-encoded body: host
``h`` plays the recording (``--data``, one snapshot a line, gzipped) from offset ``h % N`` for N
snapshots, and each pass after the first over the recording has its counters (tokens, requests,
histogram counts, ECC, PCIe, disk and network bytes) moved on, so that no series ever goes
backwards as if a replica had restarted. Gauges are replayed as recorded: the steady recording
spans a whole number of its load patterns' periods, so they carry on smoothly across the wrap.

    python bench/ingest_publisher.py --port P --hosts 2000 --rounds 60 --interval 1 \
        [--data bench/data/telemetry-8gpu-2vllm-steady.jsonl.gz]
Prints one JSON line: published, acknowledged, wall time, lateness against the schedule, CPU.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from llm_ops_helper.proto.topics import TopicKind, agent_topic

DATA = Path(__file__).resolve().parent / "data" / "telemetry-8gpu-2vllm-steady.jsonl.gz"
PER_MESSAGE = ("host", "run_id", "seq", "ts")
# Unacknowledged messages allowed in paho's queue before a backlog publisher waits.
WINDOW = 2000


def load(path: Path = DATA) -> list[dict[str, Any]]:
    with gzip.open(path, "rb") as f:
        return [msgspec.json.decode(line) for line in f if line.strip()]


def _shift(x: Any, a: Any, b: Any, k: float) -> Any:
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (x, a, b)):
        return x
    d = k * (b - a)
    return x + round(d) if isinstance(x, int) else x + d


def advanced(snapshot: dict[str, Any], first: dict[str, Any], last: dict[str, Any],
             k: float) -> dict[str, Any]:
    """``snapshot`` with each counter moved on by ``k`` times its rise over the recording."""
    out = copy.deepcopy(snapshot)

    def counters(d: dict[str, Any], d0: dict[str, Any], d1: dict[str, Any]) -> None:
        for key in d:
            if key.endswith("_total") or key == "pcie_replay_count":
                d[key] = _shift(d[key], d0.get(key), d1.get(key), k)

    for g, g0, g1 in zip(out["gpus"], first["gpus"], last["gpus"], strict=False):
        counters(g, g0, g1)
    if out.get("host_metrics") and first.get("host_metrics") and last.get("host_metrics"):
        counters(out["host_metrics"], first["host_metrics"], last["host_metrics"])
    for r, r0, r1 in zip(out["replicas"], first["replicas"], last["replicas"], strict=False):
        counters(r["metrics"], r0["metrics"], r1["metrics"])
        for name, h in r["histograms"].items():
            h0, h1 = r0["histograms"].get(name), r1["histograms"].get(name)
            if h0 is None or h1 is None or not len(h["buckets"]) == len(h0["buckets"]) == len(
                    h1["buckets"]):
                continue
            h["sum"] = _shift(h["sum"], h0["sum"], h1["sum"], k)
            h["count"] = _shift(h["count"], h0["count"], h1["count"], k)
            h["buckets"] = [[le, _shift(n, b0[1], b1[1], k)] for (le, n), b0, b1
                            in zip(h["buckets"], h0["buckets"], h1["buckets"], strict=True)]
    return out


class Bodies:
    """Pre-encoded snapshot bodies without the per-message fields, by (index, pass)."""

    def __init__(self, snapshots: list[dict[str, Any]]) -> None:
        self.snapshots = [{k: v for k, v in s.items() if k not in PER_MESSAGE} for s in snapshots]
        self.n = len(snapshots)
        self._cache: dict[tuple[int, int], bytes] = {}

    def get(self, i: int, lap: int) -> bytes:
        body = self._cache.get((i, lap))
        if body is None:
            snapshot = self.snapshots[i]
            if lap:
                # One pass further is the rise over the recording plus one more step.
                k = lap * self.n / max(1, self.n - 1)
                snapshot = advanced(snapshot, self.snapshots[0], self.snapshots[-1], k)
            body = self._cache[(i, lap)] = msgspec.json.encode(snapshot)[1:]  # without "{"
        return body

    def for_host(self, host: int, round_: int) -> bytes:
        lap, i = divmod(host % self.n + round_, self.n)
        return self.get(i, lap)


def payload(body: bytes, host: bytes, run_id: bytes, seq: int, ts: float) -> bytes:
    return b'{"host":"%b","run_id":"%b","seq":%d,"ts":%.6f,%b' % (host, run_id, seq, ts, body)


class Publisher:
    def __init__(self, port: int, client_id: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(100)
        self.acked = 0
        self.failed = 0
        self._connected = threading.Event()
        self.client.on_publish = self._on_publish
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise SystemExit(f"ingest_publisher: no CONNACK from 127.0.0.1:{port} in 10 s")

    def _on_publish(self, _client: Any, _userdata: Any, _mid: int, reason: Any,
                    _props: Any) -> None:
        if reason.is_failure:
            self.failed += 1
        else:
            self.acked += 1

    def publish(self, topic: str, data: bytes) -> None:
        info = self.client.publish(topic, data, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise SystemExit(f"ingest_publisher: publish failed: {mqtt.error_string(info.rc)}")

    def close(self, published: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.acked + self.failed < published and time.monotonic() < deadline:
            time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    bodies = Bodies(load(Path(args.data)))
    names = [f"{args.prefix}{h:04d}" for h in range(args.hosts)]
    topics = [agent_topic(name, TopicKind.TELEMETRY) for name in names]
    hosts = [name.encode() for name in names]
    salt = os.urandom(4).hex()
    run_ids = [f"{salt}{h:08x}".encode() for h in range(args.hosts)]
    for h in range(args.hosts):  # every body this run needs, encoded before the clock starts
        for r in range(args.rounds):
            bodies.for_host(h, r)
    pub = Publisher(args.port, f"llmops-bench-publisher-{os.getpid()}")
    cpu0 = time.process_time()
    start = time.monotonic()
    late: list[float] = []
    published = 0
    spacing = args.interval / args.hosts
    for r in range(args.rounds):
        seq = args.seq_start + r
        for h in range(args.hosts):
            if args.interval > 0:
                delay = start + r * args.interval + h * spacing - time.monotonic()
                if delay > 0.001:
                    time.sleep(delay)
                elif delay < 0:
                    late.append(-delay)
            else:
                while published - pub.acked - pub.failed > WINDOW:
                    time.sleep(0.001)
            pub.publish(topics[h], payload(bodies.for_host(h, r), hosts[h], run_ids[h], seq,
                                           time.time()))
            published += 1
    sent = time.monotonic()
    pub.close(published)
    late.sort()
    return {
        "hosts": args.hosts, "rounds": args.rounds, "interval_s": args.interval,
        "published": published, "acked": pub.acked, "failed": pub.failed,
        "publish_wall_s": round(sent - start, 3),
        "acked_wall_s": round(time.monotonic() - start, 3),
        "late_max_s": round(late[-1], 4) if late else 0.0,
        "late_p99_s": round(late[int(0.99 * (len(late) - 1))], 4) if late else 0.0,
        "late_over_100ms": sum(x > 0.1 for x in late),
        "cpu_s": round(time.process_time() - cpu0, 3),
        "bodies_encoded": len(bodies._cache),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hosts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between one host's snapshots; 0: a backlog, flat out")
    parser.add_argument("--seq-start", type=int, default=1)
    parser.add_argument("--prefix", default="bench-")
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args()
    print(json.dumps(run(args)), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
