"""The two consumers that bench/ingest.py times: a bare aiomqtt subscriber and the controller.

Each runs in a process of its own and answers ``sample()``: the instant, its CPU seconds (all
threads, from /proc/PID/task/*/schedstat), messages taken (accepted by the controller, received by
the bare subscriber) and handled (accepted + dropped); the controller adds what its /metrics says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import aiomqtt
import psutil
from agent_overhead import cpu_s
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client.parser import text_string_to_metric_families

from llm_ops_helper.broker import LocalMosquitto, free_port
from llm_ops_helper.proto.topics import TopicKind, all_agents

REQUIRED_METRICS = ("llmops_ingest_messages_total", "llmops_ingest_dropped_total",
                    "llmops_ingest_seq_missing", "llmops_ingest_lag_seconds",
                    "llmops_analytics_samples_total")
# Reported where the controller has them: what its rules and detectors made of the workload.
ALERTS_FIRED = "llmops_alerts_fired_total"
ANOMALIES_DETECTED = "llmops_anomalies_detected_total"
ALERTS_FIRING = "llmops_alerts_firing"

BARE = r"""
import asyncio, mmap, sys, aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
async def main(port, identifier, topic, counter_path):
    with open(counter_path, "r+b") as f:
        counter = mmap.mmap(f.fileno(), 8)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    n = 0
    async with aiomqtt.Client("127.0.0.1", port, identifier=identifier, clean_start=False,
                              protocol=aiomqtt.ProtocolVersion.V5, properties=properties) as c:
        await c.subscribe(topic, qos=1)
        async for _ in c.messages:
            n += 1
            counter[:8] = n.to_bytes(8, "little")
asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
"""



class BenchError(RuntimeError):
    """Something that makes the measurement meaningless; the message says what."""


@dataclass
class Sample:
    t: float
    cpu: float
    messages: float  # accepted (controller) or received (bare)
    handled: float  # accepted + dropped
    metrics: dict[str, Any] = field(default_factory=dict)
    scrape_s: float = 0.0  # how long /metrics took to answer (the controller's loop is blocked)


# Events that the workload makes by the thousand, and the results count from /metrics.
ROUTINE_EVENTS = frozenset({"alert_fired", "alert_resolved", "anomaly_detected"})


def log_gist(log: Path, lines: int = 2000) -> str:
    """What a consumer's log says, in a few words that still mean something once the log is
    gone: its warning-or-worse events by name, other than the workload's alerts (the controller
    logs JSON lines), else its last line (a traceback's)."""
    if not log.exists():
        return "its log is empty"
    tail = [line for line in log.read_text(errors="replace").splitlines()[-lines:] if line.strip()]
    events: Counter[str] = Counter()
    structured = False
    for line in tail:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            structured = structured or isinstance(record, dict)
            if (isinstance(record, dict) and record.get("event") not in ROUTINE_EVENTS
                    and record.get("level") in ("warning", "error", "critical")):
                events[str(record.get("event"))] += 1
    if events:
        return "its log: " + ", ".join(f"{name} x{n}" for name, n in events.most_common(6))
    if structured:
        return "its log has no warnings but the workload's alerts"
    return f"its log ends: {tail[-1][:200]!r}" if tail else "its log is empty"


class Consumer(Protocol):
    name: str
    process: psutil.Process | None
    log: Path

    async def start(self) -> None: ...
    async def sample(self) -> Sample: ...
    async def stop(self) -> None: ...


def _child_status(name: str, child: subprocess.Popen[bytes] | None, log: Path) -> None:
    if child is None or child.poll() is None:
        return
    tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
    raise BenchError(f"{name} exited with {child.returncode}; last lines of its log:\n  "
                     + "\n  ".join(tail))


def _stop_child(child: subprocess.Popen[bytes] | None, timeout_s: float = 15.0) -> int | None:
    if child is None:
        return None
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)
    return child.returncode


class BareSubscriber:
    """The least any subscriber does: aiomqtt, QoS 1, persistent session, counts messages.

    The count is written to a shared 8-byte file on every message, so the bench reads it at
    the instant it reads the CPU, without a round trip through the subscriber's event loop.
    """

    name = "bare"

    def __init__(self, broker: LocalMosquitto, work: Path) -> None:
        self.broker = broker
        self.identifier = "llmops-bench-bare"
        self.counter_path = work / "bare.count"
        self.log = work / "bare.log"
        self.child: subprocess.Popen[bytes] | None = None
        self.process: psutil.Process | None = None
        self._counter: mmap.mmap | None = None

    async def start(self) -> None:
        self.counter_path.write_bytes(bytes(8))
        with self.log.open("ab") as log:
            self.child = subprocess.Popen(
                [sys.executable, "-c", BARE, str(self.broker.port), self.identifier,
                 all_agents(TopicKind.TELEMETRY), str(self.counter_path)],
                stdout=log, stderr=subprocess.STDOUT)
        self.process = psutil.Process(self.child.pid)
        with self.counter_path.open("r+b") as f:
            self._counter = mmap.mmap(f.fileno(), 8)

    async def sample(self) -> Sample:
        _child_status("the bare subscriber", self.child, self.log)
        assert self._counter is not None
        assert self.process is not None
        t, cpu = time.monotonic(), cpu_s(self.process)
        n = int.from_bytes(self._counter[:8], "little")
        return Sample(t, cpu, n, n)

    async def stop(self) -> None:
        # SIGTERM ends it without a DISCONNECT: the broker keeps the session, as on a crash.
        _stop_child(self.child)
        if self._counter is not None:
            self._counter.close()
        self.child = self.process = self._counter = None

    async def forget_session(self) -> None:
        """Ends the session, so that later phases' messages are not queued for it too."""
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        async with aiomqtt.Client(self.broker.host, self.broker.port,
                                  identifier=self.identifier, clean_start=True,
                                  protocol=aiomqtt.ProtocolVersion.V5, properties=properties):
            pass


def controller_toml(broker: LocalMosquitto, http_port: int, state_dir: Path) -> str:
    return (f'log_level = "warning"\n'
            f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
            f'client_id = "llmops-controller"\n'
            f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n'
            f'[state]\ndir = "{state_dir}"\n'
            f'[detection]\nenabled = true\n')


@dataclass
class Scrape:
    samples: dict[str, list[tuple[dict[str, str], float]]]
    families: set[str]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        families = set()
        for family in text_string_to_metric_families(text):
            families.add(family.name)
            for s in family.samples:
                samples.setdefault(s.name, []).append((s.labels, s.value))
        return cls(samples, families)

    def has(self, name: str) -> bool:
        return (name in self.samples or name in self.families
                or name.removesuffix("_total") in self.families)

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples that carry ``labels`` (0 where none do yet)."""
        return sum(v for lab, v in self.samples.get(name, [])
                   if all(lab.get(k) == x for k, x in labels.items()))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for lab, v in self.samples.get(name, []):
            out[lab.get(label, "")] = out.get(lab.get(label, ""), 0.0) + v
        return out


class Controller:
    """``python -m llm_ops_helper.controller`` with its /metrics read over HTTP."""

    name = "controller"

    def __init__(self, broker: LocalMosquitto, work: Path, state_dir: Path,
                 profile: Path | None = None) -> None:
        self.http_port = free_port()
        state_dir.mkdir(parents=True, exist_ok=True)
        self.config = work / "controller.toml"
        self.config.write_text(controller_toml(broker, self.http_port, state_dir))
        self.log = work / "controller.log"
        self.profile = profile
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.child: subprocess.Popen[bytes] | None = None
        self.process: psutil.Process | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self, timeout_s: float = 60.0) -> None:
        """Returns as soon as /metrics answers, which is when the broker session starts: a
        drain is timed from its first messages. ``wait_connected`` waits for /healthz too."""
        prefix = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
        with self.log.open("ab") as log:
            self.child = subprocess.Popen(
                [sys.executable, *prefix, "-m", "llm_ops_helper.controller",
                 "--config", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        self.process = psutil.Process(self.child.pid)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.session.get(f"{self.url}/metrics") as resp:
                    if resp.status == 200:
                        scrape = Scrape.parse(await resp.text())
                        break
            if time.monotonic() > deadline:
                raise BenchError(f"controller: {self.url}/metrics not 200 within {timeout_s} s; "
                                 f"{log_gist(self.log)}")
            await asyncio.sleep(0.05)
        missing = [m for m in REQUIRED_METRICS if not scrape.has(m)]
        if missing:
            raise BenchError(f"controller: {self.url}/metrics lacks {', '.join(missing)}")

    async def wait_connected(self, timeout_s: float = 30.0) -> None:
        assert self.session is not None
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.session.get(f"{self.url}/healthz") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise BenchError(f"controller: {self.url}/healthz not 200 within {timeout_s} s "
                                 f"(broker not connected?); {log_gist(self.log)}")
            await asyncio.sleep(0.1)

    def check(self) -> None:
        _child_status("the controller", self.child, self.log)

    async def scrape(self) -> Scrape:
        assert self.session is not None
        try:
            async with self.session.get(f"{self.url}/metrics") as resp:
                if resp.status != 200:
                    raise BenchError(f"controller: GET {self.url}/metrics answered {resp.status}")
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.check()
            raise BenchError(f"controller: GET {self.url}/metrics failed: {exc!r}") from None
        return Scrape.parse(text)

    async def sample(self) -> Sample:
        self.check()
        assert self.process is not None
        t, cpu = time.monotonic(), cpu_s(self.process)
        scrape = await self.scrape()
        took = time.monotonic() - t
        for name in REQUIRED_METRICS:
            if not scrape.has(name):
                raise BenchError(f"controller: {self.url}/metrics lacks {name}")
        accepted = scrape.value("llmops_ingest_messages_total", kind="telemetry")
        drops = scrape.by_label("llmops_ingest_dropped_total", "reason")
        return Sample(t, cpu, accepted, accepted + sum(drops.values()), {
            "drops": drops,
            "seq_missing": scrape.value("llmops_ingest_seq_missing"),
            "lag_s": scrape.value("llmops_ingest_lag_seconds"),
            "analytics_samples": scrape.value("llmops_analytics_samples_total"),
            "alerts_fired": scrape.value(ALERTS_FIRED) if scrape.has(ALERTS_FIRED) else None,
            "anomalies_detected": (scrape.value(ANOMALIES_DETECTED)
                                   if scrape.has(ANOMALIES_DETECTED) else None),
            "alerts_firing": scrape.by_label(ALERTS_FIRING, "severity"),
            "rss_mb": self.process.memory_info().rss / 2**20,
        }, took)

    async def stop(self) -> None:
        if self.child is None:
            return
        code = _stop_child(self.child, timeout_s=30.0 if self.profile else 15.0)
        if self.session is not None:
            await self.session.close()
        if code not in (None, 0, -signal.SIGTERM):
            raise BenchError(f"controller exited with {code} on SIGTERM; {log_gist(self.log)}")
        self.child = self.process = self.session = None


