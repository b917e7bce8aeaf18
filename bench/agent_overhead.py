"""Agent overhead: CPU (% of one core) and peak RSS of a real ``llmops-agent`` process.

The agent runs at a 1 s interval with 8 simulated GPUs, host metrics and 2 replicas scraped over
HTTP, publishing to a private Mosquitto, for DURATION seconds. Beside it, in the same window:
a baseline process doing the least any Python MQTT agent does (one aiomqtt connection
publishing a payload of the same size every second), and the agent again with one source at a
time, whose differences from the publish-only agent are what each source costs. Ratios to the
baseline are what to compare between runs on these shared machines.

    python bench/agent_overhead.py [--duration 60]
Writes bench/results/agent_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from llm_ops_helper.broker import LocalMosquitto, free_port

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "tests" / "fixtures" / "metrics"

BASELINE = r"""
import asyncio, sys, aiomqtt
async def main(port, size):
    payload = b"x" * size
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        while True:
            await c.publish("bench/baseline", payload, qos=1)
            await asyncio.sleep(1.0)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


def serve_fixtures(ports: tuple[int, int]) -> subprocess.Popen[bytes]:
    """Two /metrics endpoints (vLLM, llama.cpp) in their own process, so their CPU isn't counted."""
    code = (
        "import sys\nfrom aiohttp import web\n"
        "def app(text):\n"
        "    a = web.Application()\n"
        "    a.router.add_get('/metrics', lambda r: web.Response(text=text))\n"
        "    return a\n"
        "async def main():\n"
        "    for port, name in ((int(sys.argv[1]), 'vllm.txt'), (int(sys.argv[2]), 'llamacpp.txt')):\n"
        f"        runner = web.AppRunner(app(open({str(FIXTURES)!r} + '/' + name).read()))\n"
        "        await runner.setup()\n"
        "        await web.TCPSite(runner, '127.0.0.1', port).start()\n"
        "    import asyncio; await asyncio.Event().wait()\n"
        "import asyncio; asyncio.run(main())\n")
    return subprocess.Popen([sys.executable, "-c", code, str(ports[0]), str(ports[1])])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return psutil.Process(pid).memory_info().rss / 2**20


def cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of the process, all threads: /proc/PID/schedstat counts nanoseconds, where
    cpu_times() counts 10 ms ticks (a 2 % step at these loads over 60 s)."""
    total = 0
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def agent_toml(host: str, broker_port: int, ports: tuple[int, int], *, gpus: bool, host_metrics: bool,
               replicas: bool) -> str:
    text = (f'host = "{host}"\nlog_level = "warning"\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {broker_port}\n[telemetry]\ninterval_s = 1.0\n'
            f'[gpus]\nbackend = "{"simulated" if gpus else "none"}"\nsimulated_count = 8\n'
            f'[host_metrics]\nenabled = {"true" if host_metrics else "false"}\n')
    if replicas:
        text += (f'[[replicas]]\nname = "vllm-0"\nruntime = "vllm"\n'
                 f'metrics_url = "http://127.0.0.1:{ports[0]}/metrics"\n'
                 f'[[replicas]]\nname = "llamacpp-0"\nruntime = "llamacpp"\n'
                 f'metrics_url = "http://127.0.0.1:{ports[1]}/metrics"\n')
    return text


# The agent as the issue sizes it, and the same agent with one source at a time, all running
# side by side in one window so that their differences are the cost of each source.
VARIANTS = {
    "agent": {"gpus": True, "host_metrics": True, "replicas": True},
    "publish_only": {"gpus": False, "host_metrics": False, "replicas": False},
    "gpus_only": {"gpus": True, "host_metrics": False, "replicas": False},
    "host_only": {"gpus": False, "host_metrics": True, "replicas": False},
    "replicas_only": {"gpus": False, "host_metrics": False, "replicas": True},
}


async def measure(duration: float) -> dict[str, object]:
    ports = (free_port(), free_port())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = LocalMosquitto(work / "mosquitto")
        await broker.start()
        servers = serve_fixtures(ports)
        children: dict[str, subprocess.Popen[bytes]] = {}
        for name, sources in VARIANTS.items():
            config = work / f"{name}.toml"
            config.write_text(agent_toml(f"bench-{name}".replace("_", "-"), broker.port, ports,
                                         **sources))
            children[name] = subprocess.Popen([sys.executable, "-m", "llm_ops_helper.agent",
                                               "--config", str(config)], stdout=subprocess.DEVNULL)
        # The baseline publishes what one of the agent's snapshots weighs.
        children["baseline"] = subprocess.Popen(
            [sys.executable, "-c", BASELINE, str(broker.port), "9000"])
        try:
            await asyncio.sleep(5.0)  # start-up (imports, first connect) is not steady state
            procs = {name: psutil.Process(child.pid) for name, child in children.items()}
            start = {name: cpu_s(p) for name, p in procs.items()}
            t0 = time.monotonic()
            await asyncio.sleep(duration)
            wall = time.monotonic() - t0
            pct = {name: 100 * (cpu_s(p) - start[name]) / wall for name, p in procs.items()}
            peak = {name: peak_rss_mb(p.pid) for name, p in procs.items()}
            for name, child in children.items():
                if child.poll() is not None:
                    raise SystemExit(f"{name} exited early with {child.returncode}")
        finally:
            for child in [*children.values(), servers]:
                child.terminate()
            for child in [*children.values(), servers]:
                child.wait(10)
            await broker.stop()
    agent_pct, base_pct = pct["agent"], pct["baseline"]
    floor = pct["publish_only"]
    return {
        "benchmark": "agent_overhead",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "setup": "1 s interval, 8 simulated GPUs, host metrics, 2 replicas scraped "
                 "(a two-engine vLLM page of 87 KB and a llama.cpp page), QoS 1 to a local "
                 "Mosquitto; CPU from /proc/PID/task/*/schedstat (ns)",
        "duration_s": round(wall, 1),
        "agent": {"cpu_pct_of_one_core": round(agent_pct, 3),
                  "cpu_ms_per_tick": round(10 * agent_pct, 3),
                  "peak_rss_mb": round(peak["agent"], 1)},
        "baseline_bare_aiomqtt_publisher": {"cpu_pct_of_one_core": round(base_pct, 3),
                                            "peak_rss_mb": round(peak["baseline"], 1)},
        "ratio_to_baseline": {"cpu": round(agent_pct / base_pct, 2) if base_pct else None,
                              "rss": round(peak["agent"] / peak["baseline"], 2)},
        "breakdown_cpu_ms_per_tick": {
            "publish_only": round(10 * floor, 3),
            **{f"{name}_added": round(10 * (pct[name] - floor), 3)
               for name in ("gpus_only", "host_only", "replicas_only")},
        },
        "targets": {"cpu_pct_of_one_core": 0.5, "peak_rss_mb": 50},
        "meets_targets": {"cpu": agent_pct < 0.5, "rss": peak["agent"] < 50},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    result = asyncio.run(measure(args.duration))
    out = HERE / "results" / "agent_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
