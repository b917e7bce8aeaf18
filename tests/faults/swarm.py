"""A swarm of simulated agents in one cheap process, for the load test (tests/faults/test_load.py).

Each host of the swarm behaves on the wire as an agent does: a retained ``online`` status with
its interval (QoS 1), then one telemetry snapshot per interval at QoS 1 with its own run_id, seq
rising by 1 and ts = now, hosts spread evenly over the interval. The snapshots are real agent
output (8 simulated GPUs, host metrics, 2 vLLM replicas scraped over HTTP) recorded by
bench/data/record_snapshots.py and replayed, pre-encoded, by bench/ingest_publisher.py's
:class:`Bodies` (counters moved on at each pass over the recording, so no series goes backwards).

One MQTT connection carries the whole process's hosts (2,000 paho connections with a thread each
would cost more than the controller under test). Its Last Will is the ``offline`` status of the
process's first host, so a swarm process that dies shows up at the controller as an agent lost;
a clean end disconnects without it.

    python -m tests.faults.swarm --port P --first 0 --hosts 500 --seconds 600 [--interval 1]
Prints one JSON line at the end: statuses and telemetry published and acknowledged by the
broker, lateness against the schedule, CPU; ``--progress FILE`` is rewritten every few seconds
with the counts so far.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from llm_ops_helper.proto import codec
from llm_ops_helper.proto.messages import Status
from llm_ops_helper.proto.topics import TopicKind, agent_topic

BENCH = Path(__file__).resolve().parents[2] / "bench"
DATA = BENCH / "data" / "telemetry-8gpu-2vllm-steady.jsonl.gz"
PREFIX = "soak-"
PROGRESS_EVERY_S = 2.0


def _publisher_module() -> Any:
    """bench/ingest_publisher.py (not a package): its recording loader and pre-encoded bodies."""
    spec = importlib.util.spec_from_file_location("ingest_publisher", BENCH / "ingest_publisher.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"swarm: cannot load {BENCH / 'ingest_publisher.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def host_name(index: int) -> str:
    return f"{PREFIX}{index:04d}"


def status(host: str, run_id: str, state: str, interval_s: float,
           reason: str | None = None) -> bytes:
    return codec.encode(Status(host=host, state=state,  # type: ignore[arg-type]
                               ts=time.time(), run_id=run_id, agent_version="swarm",
                               interval_s=interval_s, reason=reason))


class Link:
    """One paho connection (MQTT v5, its own network thread) counting the broker's PUBACKs."""

    def __init__(self, port: int, client_id: str, will: tuple[str, bytes]) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.acked = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self.client.on_publish = self._on_publish
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(20):
            raise SystemExit(f"swarm: no CONNACK from 127.0.0.1:{port} in 20 s")

    def _on_publish(self, _c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        with self._lock:
            if reason.is_failure:
                self.failed += 1
            else:
                self.acked += 1

    def publish(self, topic: str, data: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, data, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise SystemExit(f"swarm: publish failed: {mqtt.error_string(info.rc)}")

    def close(self, published: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.acked + self.failed < published and time.monotonic() < deadline:
            time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    pub = _publisher_module()
    bodies = pub.Bodies(pub.load(Path(args.data)))
    indices = range(args.first, args.first + args.hosts)
    names = [host_name(i) for i in indices]
    salt = os.urandom(4).hex()
    run_ids = [f"{salt}{i:08x}" for i in indices]
    rounds = max(1, round(args.seconds / args.interval))
    for h in indices:  # every body this run needs, encoded before the clock starts
        for r in range(rounds):
            bodies.for_host(h, r)
    telemetry_topics = [agent_topic(n, TopicKind.TELEMETRY) for n in names]
    status_topics = [agent_topic(n, TopicKind.STATUS) for n in names]
    will = (status_topics[0], status(names[0], run_ids[0], "offline", args.interval, "lost"))
    link = Link(args.port, f"llmops-swarm-{args.first}-{os.getpid()}", will)
    for name, run_id, topic in zip(names, run_ids, status_topics, strict=True):
        link.publish(topic, status(name, run_id, "online", args.interval), retain=True)
    statuses = len(names)
    host_bytes = [n.encode() for n in names]
    run_bytes = [r.encode() for r in run_ids]
    cpu0 = time.process_time()
    start = time.monotonic()
    late: list[float] = []
    telemetry = 0
    spacing = args.interval / args.hosts
    next_progress = start + PROGRESS_EVERY_S

    def progress() -> dict[str, Any]:
        return {"hosts": args.hosts, "first": args.first, "statuses": statuses,
                "telemetry": telemetry, "acked": link.acked, "failed": link.failed,
                "last_seq": telemetry // args.hosts}

    for r in range(rounds):
        seq = 1 + r
        for k, h in enumerate(indices):
            delay = start + r * args.interval + k * spacing - time.monotonic()
            if delay > 0.001:
                time.sleep(delay)
            elif delay < 0:
                late.append(-delay)
            link.publish(telemetry_topics[k], pub.payload(bodies.for_host(h, r), host_bytes[k],
                                                         run_bytes[k], seq, time.time()))
            telemetry += 1
        if args.progress and time.monotonic() >= next_progress:
            next_progress += PROGRESS_EVERY_S
            Path(args.progress).write_text(json.dumps(progress()))
    sent = time.monotonic()
    link.close(statuses + telemetry)
    late.sort()
    out = progress() | {
        "interval_s": args.interval, "rounds": rounds,
        "publish_wall_s": round(sent - start, 3),
        "acked_wall_s": round(time.monotonic() - start, 3),
        "late_max_s": round(late[-1], 4) if late else 0.0,
        "late_p99_s": round(late[int(0.99 * (len(late) - 1))], 4) if late else 0.0,
        "late_over_1s": sum(x > 1.0 for x in late),
        "cpu_s": round(time.process_time() - cpu0, 3),
    }
    if args.progress:
        Path(args.progress).write_text(json.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of the first host")
    parser.add_argument("--hosts", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--progress", help="rewritten every few seconds with the counts so far")
    args = parser.parse_args()
    print(json.dumps(run(args)), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
