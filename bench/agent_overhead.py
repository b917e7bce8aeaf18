"""Agent overhead: CPU (% of one core) and peak RSS of a real ``llmops-agent`` process.

The agent runs at a 1 s interval with 8 simulated GPUs, host metrics and 2 replicas scraped over
HTTP, publishing to a private Mosquitto, for DURATION seconds. Beside it, in the same run and
under the same load, a baseline process does the least any Python MQTT agent does: one aiomqtt
connection publishing a payload of the same size every second. Ratios to the baseline are what
to compare between runs on these shared machines; absolute figures are recorded too.

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
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


async def measure(duration: float) -> dict[str, object]:
    ports = (free_port(), free_port())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = LocalMosquitto(work / "mosquitto")
        await broker.start()
        servers = serve_fixtures(ports)
        config = work / "agent.toml"
        config.write_text(
            f'host = "bench-gpu"\nlog_level = "warning"\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n'
            f'[telemetry]\ninterval_s = 1.0\n[gpus]\nbackend = "simulated"\nsimulated_count = 8\n'
            f'[[replicas]]\nname = "vllm-0"\nruntime = "vllm"\n'
            f'metrics_url = "http://127.0.0.1:{ports[0]}/metrics"\n'
            f'[[replicas]]\nname = "llamacpp-0"\nruntime = "llamacpp"\n'
            f'metrics_url = "http://127.0.0.1:{ports[1]}/metrics"\n')
        agent = subprocess.Popen([sys.executable, "-m", "llm_ops_helper.agent", "--config",
                                  str(config)], stdout=subprocess.DEVNULL)
        # The baseline publishes what one of the agent's snapshots weighs.
        baseline = subprocess.Popen([sys.executable, "-c", BASELINE, str(broker.port), "9000"])
        try:
            await asyncio.sleep(5.0)  # start-up (imports, first connect) is not steady state
            procs = {"agent": psutil.Process(agent.pid), "baseline": psutil.Process(baseline.pid)}
            start = {name: cpu_s(p) for name, p in procs.items()}
            t0 = time.monotonic()
            await asyncio.sleep(duration)
            wall = time.monotonic() - t0
            used = {name: cpu_s(p) - start[name] for name, p in procs.items()}
            peak = {name: peak_rss_mb(p.pid) for name, p in procs.items()}
            for name, proc in (("agent", agent), ("baseline", baseline)):
                if proc.poll() is not None:
                    raise SystemExit(f"{name} exited early with {proc.returncode}")
        finally:
            for proc in (agent, baseline, servers):
                proc.terminate()
            for proc in (agent, baseline, servers):
                proc.wait(10)
            await broker.stop()
    agent_pct = 100 * used["agent"] / wall
    base_pct = 100 * used["baseline"] / wall
    return {
        "benchmark": "agent_overhead",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "setup": "1 s interval, 8 simulated GPUs, host metrics, 2 replicas scraped "
                 "(vLLM and llama.cpp /metrics pages), QoS 1 to a local Mosquitto",
        "duration_s": round(wall, 1),
        "agent": {"cpu_pct_of_one_core": round(agent_pct, 3),
                  "cpu_ms_per_tick": round(1000 * used["agent"] / wall, 3),
                  "peak_rss_mb": round(peak["agent"], 1)},
        "baseline_bare_aiomqtt_publisher": {"cpu_pct_of_one_core": round(base_pct, 3),
                                            "peak_rss_mb": round(peak["baseline"], 1)},
        "ratio_to_baseline": {"cpu": round(agent_pct / base_pct, 2) if base_pct else None,
                              "rss": round(peak["agent"] / peak["baseline"], 2)},
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
