"""Records the telemetry snapshots that ``bench/ingest.py`` replays as a fleet.

Runs the real agent (``python -m llm_ops_helper.agent``) against a private Mosquitto: 8
simulated GPUs playing a scenario, host metrics, and two vLLM replicas scraped over HTTP from a
server that serves ``tests/fixtures/metrics/vllm.txt`` with its counters rising and its gauges
moving between requests. The snapshots are taken off the broker as published, one JSON payload
per line, gzipped. Two recordings, one per workload of the bench:

faults  ``systemd/scenario.example.toml`` (load waves, a hot GPU, ECC errors, a GPU off the bus,
        a power cap, throttling): a fault storm on every host of the fleet.
            python bench/data/record_snapshots.py
        writes telemetry-8gpu-2vllm.jsonl.gz (60 snapshots, a minute at the agent's 1 s).
steady  ``bench/data/steady.toml``: every GPU under a load pattern of its own, nothing faulty.
            python bench/data/record_snapshots.py --scenario bench/data/steady.toml \
                --out bench/data/telemetry-8gpu-2vllm-steady.jsonl.gz --count 120 --warmup 180
        Temperature follows power over half a minute, so the first 180 s are dropped (the GPUs
        reach their periodic state), and 120 s is a whole number of every pattern's period: a
        host's replay wraps from the last snapshot to the first without a jump.

Either way the script ends by comparing the jump at the wrap (last snapshot to first) in each
GPU's temperature, power and utilisation with the largest step inside the recording. The
steady one passes (its temperatures move by at most 1 C at the wrap, as between neighbours; three
square waves happen to switch there, as they would next anyway); the faults one does not (GPU 1
falls from 82 C to 27 C, the scenario's end to its start).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import aiomqtt
from aiohttp import web

from llm_ops_helper.broker import LocalMosquitto, free_port
from llm_ops_helper.proto import codec
from llm_ops_helper.proto.messages import Telemetry
from llm_ops_helper.proto.topics import TopicKind, agent_topic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "metrics" / "vllm.txt"
SCENARIO = ROOT / "systemd" / "scenario.example.toml"
OUT = HERE / "telemetry-8gpu-2vllm.jsonl.gz"
HOST = "gpu-rec-01"
WARMUP = 2  # the first snapshots have no replica rates yet and the GPUs just appeared
SEAM_FIELDS = ("temperature_c", "power_w", "utilization_gpu_pct")
SEAM_SLACK = 2.0

COUNTER_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def varied_page(text: str, n: int, rng: random.Random) -> str:
    """``text`` as the n-th scrape: counters (and histograms, all by one factor, so buckets stay
    cumulative and consistent with their count) grow; the queue and KV-cache gauges move."""
    growth = 1.0 + 0.003 * n
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            out.append(line)
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        x = float(value)
        if name.endswith(COUNTER_SUFFIXES):
            x *= growth
        elif name == "vllm:num_requests_running":
            x = float(max(0, round(x * rng.uniform(0.5, 1.5))))
        elif name == "vllm:num_requests_waiting":
            x = float(rng.choice((0, 0, 0, 1, 2, 5, 12)))
        elif name == "vllm:kv_cache_usage_perc":
            x = min(1.0, max(0.0, x + rng.uniform(-0.25, 0.25)))
        out.append(f"{series} {x!r}")
    return "\n".join(out) + "\n"


async def serve_replica(port: int, seed: int) -> web.AppRunner:
    text = FIXTURE.read_text()
    rng = random.Random(seed)
    scrapes = 0

    async def metrics(_request: web.Request) -> web.Response:
        nonlocal scrapes
        scrapes += 1
        return web.Response(text=varied_page(text, scrapes, rng),
                            content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def agent_toml(broker: LocalMosquitto, ports: list[int], scenario: Path) -> str:
    text = (f'host = "{HOST}"\nlog_level = "warning"\n'
            f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
            '[telemetry]\ninterval_s = 1.0\n'
            f'[gpus]\nbackend = "simulated"\nsimulated_count = 8\nscenario = "{scenario}"\n'
            '[host_metrics]\nenabled = true\n')
    for i, port in enumerate(ports):
        text += (f'[[replicas]]\nname = "vllm-{i}"\nruntime = "vllm"\n'
                 f'metrics_url = "http://127.0.0.1:{port}/metrics"\n')
    return text


async def record(count: int, scenario: Path, warmup: int) -> list[bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = LocalMosquitto(work / "mosquitto")
        await broker.start()
        ports = [free_port(), free_port()]
        runners = [await serve_replica(port, seed) for seed, port in enumerate(ports)]
        config = work / "agent.toml"
        config.write_text(agent_toml(broker, ports, scenario))
        payloads: list[bytes] = []
        agent: subprocess.Popen[bytes] | None = None
        try:
            async with aiomqtt.Client(broker.host, broker.port,
                                      protocol=aiomqtt.ProtocolVersion.V5) as client:
                await client.subscribe(agent_topic(HOST, TopicKind.TELEMETRY), qos=1)
                agent = subprocess.Popen([sys.executable, "-m", "llm_ops_helper.agent",
                                          "--config", str(config)],
                                         stdout=subprocess.DEVNULL)
                async with asyncio.timeout((count + warmup) * 2 + 30):
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        payloads.append(message.payload)
                        print(f"\r{len(payloads)}/{count + warmup}", end="", flush=True)
                        if len(payloads) == count + warmup:
                            break
            print()
        finally:
            if agent is not None:
                agent.terminate()
                agent.wait(10)
            for runner in runners:
                await runner.cleanup()
            await broker.stop()
    return payloads[warmup:]


def seams(snapshots: list[Telemetry]) -> dict[str, tuple[float, float, list[int]]]:
    """Per field: the largest jump of any GPU from the last snapshot to the first (what a
    replay sees when it wraps), the largest step between neighbours inside the recording, and
    the GPUs whose jump at the wrap is more than ``SEAM_SLACK`` times any step of their own
    inside it. Not "no larger than": the wrap is one more step of the load's noise, and on a
    square wave it may fall on an edge, as it does in the steady recording."""
    out: dict[str, tuple[float, float, list[int]]] = {}
    for name in SEAM_FIELDS:
        wraps, steps, odd = [], [], []
        for i in range(len(snapshots[0].gpus)):
            xs = [x for s in snapshots if (x := getattr(s.gpus[i], name)) is not None]
            if len(xs) < 2:
                continue
            wrap = abs(xs[0] - xs[-1])
            step = max(abs(b - a) for a, b in itertools.pairwise(xs))
            wraps.append(wrap)
            steps.append(step)
            if wrap > SEAM_SLACK * max(step, 1.0):
                odd.append(i)
        out[name] = (max(wraps, default=0.0), max(steps, default=0.0), odd)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=60, help="snapshots to keep")
    parser.add_argument("--scenario", type=Path, default=SCENARIO,
                        help="the simulated GPUs' scenario (default: the fault demo)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help=f"snapshots dropped first (default {WARMUP}: replica rates need "
                             "two scrapes)")
    args = parser.parse_args()
    payloads = asyncio.run(record(args.count, args.scenario.resolve(), max(WARMUP, args.warmup)))
    snapshots = []
    for payload in payloads:
        snapshot = codec.decode(payload, Telemetry)  # each one must be a valid snapshot
        if len(snapshot.gpus) != 8 or len(snapshot.replicas) != 2:
            raise SystemExit(f"snapshot seq {snapshot.seq} has {len(snapshot.gpus)} GPUs and "
                             f"{len(snapshot.replicas)} replicas, expected 8 and 2")
        if b"\n" in payload:
            raise SystemExit("a payload spans lines; the JSONL file needs one per line")
        snapshots.append(snapshot)
    with gzip.open(args.out, "wb") as f:
        f.writelines(payload + b"\n" for payload in payloads)
    sizes = sorted(len(p) for p in payloads)
    print(f"wrote {len(payloads)} snapshots to {args.out} ({args.out.stat().st_size} bytes "
          f"gzipped; {sizes[0]}-{sizes[-1]} bytes each, median {sizes[len(sizes) // 2]}); "
          f"{snapshots[-1].ts - snapshots[0].ts:.1f} s from first to last")
    for name, (wrap, step, odd) in seams(snapshots).items():
        print(f"  {name}: largest jump at the wrap {wrap:g}, largest step inside {step:g}"
              + (f"; GPU(s) {odd} jump when the replay wraps" if odd else ""))


if __name__ == "__main__":
    main()
