"""Gateway overhead: requests/s and added latency through ``llmops-gateway`` (guards on) vs.
straight to the simulator replicas, in the same run.

N simulator replicas (real processes) serve one deployment; a controller stand-in tells the gateway (a real process, one event loop)
where they are. One aiohttp load generator sends the same chat request (16 output tokens,
non-streamed, and streamed for latency) either straight to the replicas in turn or through
the gateway with a key whose guards run the injection check and redact the output. Phases
alternate direct / gateway, REPEATS times, so both see the same machine state.

* latency: concurrency 1, the added p50/p99 = gateway's minus direct's.
* throughput: concurrency C for DURATION s each; the gateway's share of the direct rate, and
  the CPU time each process (load generator, gateway, replicas) spent per request, which says
  where the share goes on a machine whose cores all three share.

Two scenarios, each with its own replicas:

* no model latency (ttft and inter-token time 0): latency and throughput at C. Everything is
  CPU, and the load generator, the gateway and the replicas share the machine's cores.
* model latency (50 ms to the first token, 10 ms a token, as a small model on a GPU):
  throughput at MODEL_C, the gateway's share when replicas take time as real ones do.

Targets (the issue): added p50 under 1 ms; the gateway with guards keeps >= half of the
direct throughput.

    python bench/gateway.py [--replicas 4] [--concurrency 32] [--model-concurrency 128]
                            [--duration 5] [--quick]
Writes bench/results/gateway.json (not with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.broker import free_port
from llm_ops_helper.localfleet import gateway_toml

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "gateway.json"
KEY = "sk-bench-key"  # guards on
OPEN_KEY = "sk-bench-open"  # no guards: what the guards cost, beside
BODY = {"model": "sim", "max_tokens": 16,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Write one sentence about the sea, please."}]}


async def wait_http(session: aiohttp.ClientSession, url: str, timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


# The stress case: replicas that answer at once, so everything is CPU and the three processes
# on the request's path compete for the same cores.
NO_MODEL_LATENCY = {"ttft_base_ms": 0.0, "ttft_per_prompt_token_ms": 0.0, "itl_ms": 0.0}
# A model that takes time (50 ms to the first token, then 10 ms a token: about 0.2 s for the
# 16 tokens), as real replicas do: what the gateway keeps of the rate when it is not competing
# with instant replicas for CPU.
MODEL_LATENCY = {"ttft_base_ms": 50.0, "ttft_per_prompt_token_ms": 0.0, "itl_ms": 10.0}


def start_replicas(n: int, work: Path, latency_model: dict[str, float]
                   ) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    card = write_model_card(work / "card.toml", startup_s=0.0, max_concurrency=256,
                            **latency_model)
    procs, urls = [], []
    for _ in range(n):
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "llm_ops_helper.agent.runtimes.simserver", "--model-card",
             str(card), "--port", str(port), "--served-model-name", "sim",
             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        urls.append(f"http://127.0.0.1:{port}")
    return procs, urls


async def controller_standin(urls: list[str]) -> tuple[web.AppRunner, str]:
    endpoints = [{"replica": f"sim-{i}", "host": "h", "url": u, "version": "sim@1"}
                 for i, u in enumerate(urls)]
    app = web.Application()
    app.router.add_get("/api/v1/deployments",
                       lambda r: web.json_response({"deployments": [{"name": "sim"}]}))
    app.router.add_get("/api/v1/deployments/{name}/endpoints",
                       lambda r: web.json_response({"endpoints": endpoints}))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def gateway_config(work: Path, controller: str, port: int) -> Path:
    path = work / "gateway.toml"
    path.write_text(gateway_toml(
        controller, port, work / "gw-state", log_level="warning",
        keys=[{"name": "bench", "key": KEY, "guards": "on"}, {"name": "open", "key": OPEN_KEY}],
        tables={"controller": {"refresh_s": 5.0},
                "guards.on": {"injection": True, "redact_output": True}}))
    return path


async def one(session: aiohttp.ClientSession, target: str, stream: bool) -> float:
    url, _, key = target.partition(" ")
    started = time.perf_counter()
    async with session.post(url, json={**BODY, "stream": stream},
                            headers={"Authorization": f"Bearer {key or KEY}"}) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status}")
    return time.perf_counter() - started


async def latency(session: aiohttp.ClientSession, urls: list[str], n: int,
                  stream: bool) -> list[float]:
    turn = itertools.cycle(urls)
    return [await one(session, next(turn), stream) for _ in range(n)]


def cpu_seconds(processes: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """User plus system CPU time so far of each group of processes."""
    return {name: sum(sum(p.cpu_times()[:2]) for p in group)
            for name, group in processes.items()}


async def throughput(session: aiohttp.ClientSession, urls: list[str], concurrency: int,
                     duration_s: float, processes: dict[str, list[psutil.Process]] | None = None
                     ) -> tuple[float, dict[str, float]]:
    """Requests/s, and each process group's CPU microseconds per request."""
    turn = itertools.cycle(urls)
    done = 0
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await one(session, next(turn), False)
            done += 1
    before = cpu_seconds(processes or {})
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    after = cpu_seconds(processes or {})
    return done / elapsed, {name: (after[name] - before[name]) * 1e6 / max(done, 1)
                            for name in after}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(args: argparse.Namespace, latency_model: dict[str, float], concurrency: int,
                latency_phases: bool) -> dict[str, Any]:
    """One scenario: latency at concurrency 1 (if ``latency_phases``) and throughput at
    ``concurrency``, direct / through the gateway with guards / without, alternating."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        procs, urls = start_replicas(args.replicas, work, latency_model)
        controller, controller_url = await controller_standin(urls)
        port = free_port()
        gateway = subprocess.Popen(
            [sys.executable, "-m", "llm_ops_helper.controller.gateway", "--config",
             str(gateway_config(work, controller_url, port))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gw = [f"http://127.0.0.1:{port}/v1/chat/completions"]
        gw_open = [f"{gw[0]} {OPEN_KEY}"]
        direct = [u + "/v1/chat/completions" for u in urls]
        connector = aiohttp.TCPConnector(limit=0)
        processes = {"load_generator": [psutil.Process()],
                     "gateway": [psutil.Process(gateway.pid)],
                     "replicas": [psutil.Process(p.pid) for p in procs]}
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                for u in urls:
                    await wait_http(session, u + "/health")
                await wait_http(session, f"http://127.0.0.1:{port}/healthz")
                for target in (direct, gw, gw_open):  # warm up: connections, caches
                    if latency_phases:
                        await latency(session, target, 200, False)
                    await throughput(session, target, concurrency, 1.0)
                phases = (("direct", direct), ("gateway", gw), ("gateway_no_guards", gw_open))
                lat: dict[str, list[float]] = {}
                rps: dict[str, list[float]] = {name: [] for name, _ in phases}
                cpu: dict[str, list[dict[str, float]]] = {name: [] for name, _ in phases}
                for name, _ in phases:
                    lat[name], lat[name + "_stream"] = [], []
                for _ in range(args.repeats):
                    for name, target in phases:
                        if latency_phases:
                            lat[name] += await latency(session, target, args.requests, False)
                            lat[name + "_stream"] += await latency(session, target,
                                                                   args.requests // 2, True)
                        rate, used = await throughput(session, target, concurrency,
                                                      args.duration, processes)
                        rps[name].append(rate)
                        cpu[name].append(used)
        finally:
            gateway.terminate()
            gateway.wait(20)
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
            await controller.cleanup()

    out: dict[str, Any] = {"requests_per_s": {}}
    for name, values in rps.items():
        out["requests_per_s"][name] = {"median": round(statistics.median(values), 1),
                                       "runs": [round(v, 1) for v in values]}
    out["cpu_us_per_request"] = {
        name: {group: round(statistics.median(run[group] for run in runs), 1)
               for group in processes} for name, runs in cpu.items()}
    for used in out["cpu_us_per_request"].values():
        used["total"] = round(sum(used.values()), 1)
    direct_rps = out["requests_per_s"]["direct"]["median"]
    share = out["requests_per_s"]["gateway"]["median"] / direct_rps
    out["gateway_share_of_direct"] = round(share, 3)
    out["gateway_no_guards_share_of_direct"] = round(
        out["requests_per_s"]["gateway_no_guards"]["median"] / direct_rps, 3)
    out["targets"] = {"throughput_at_least_half": share >= 0.5}
    if latency_phases:
        out["latency_ms"] = latency_figures(lat)
        out["targets"]["added_p50_under_1ms"] = out["latency_ms"]["added"]["p50"] < 1.0
    return out


def latency_figures(lat: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """p50/p99 of each phase in ms, and what the gateway adds to direct's, with and without
    guards, whole and streamed."""
    def ms(values: list[float], q: float) -> float:
        return round(pct(values, q) * 1000, 3)

    out: dict[str, dict[str, float]] = {
        name: {"p50": ms(values, 0.5), "p99": ms(values, 0.99), "n": len(values)}
        for name, values in lat.items()}
    for added, phase, base in (("added", "gateway", "direct"),
                               ("added_stream", "gateway_stream", "direct_stream"),
                               ("added_no_guards", "gateway_no_guards", "direct")):
        out[added] = {p: round(out[phase][p] - out[base][p], 3) for p in ("p50", "p99")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32,
                        help="in flight at once, replicas without model latency")
    parser.add_argument("--model-concurrency", type=int, default=128,
                        help="in flight at once, replicas with model latency")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=1000, help="latency samples a phase")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke test; writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.requests, args.repeats = 1.0, 100, 1
    results = asyncio.run(bench(args, NO_MODEL_LATENCY, args.concurrency, True))
    with_latency = asyncio.run(bench(args, MODEL_LATENCY, args.model_concurrency, False))
    doc = {
        "what": "chat completions (16 tokens) straight to the sim replicas vs. through "
                "llmops-gateway with guards on (injection check, output redaction) and off, "
                "alternating phases in one run; 'results': replicas with no model latency (the "
                "stress case); 'with_model_latency': replicas taking about 0.2 s a request",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "arch": platform.machine(),
                    "python": platform.python_version()},
        "params": {"replicas": args.replicas, "concurrency": args.concurrency,
                   "model_concurrency": args.model_concurrency,
                   "duration_s": args.duration, "latency_requests": args.requests,
                   "repeats": args.repeats, "model_latency": MODEL_LATENCY},
        "results": results,
        "with_model_latency": with_latency,
        "note": "one gateway process (one event loop); the load generator is one Python "
                "process too and shares the cores with replicas and gateway, so on a machine "
                "with few cores the gateway's share of the direct rate is a share of CPU "
                "time: direct, a request crosses two processes; through the gateway, three",
    }
    if not args.quick:
        OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"results": results, "with_model_latency": with_latency}, indent=2))


if __name__ == "__main__":
    main()
