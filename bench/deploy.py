"""Deploy: time from ``deploy_model`` to ready for 1 and 8 replicas, and the rollout of a new
version over them, against the bare cost of starting the same servers by hand.

A LocalFleet (Mosquitto, the controller and 2 agents as real processes, 4 simulated
a100-sxm4-80gb GPUs each) serves two runtimes in turn: ``llamacpp`` (llama.cpp's server on the
tiny generated GGUF model, on CPU) and ``sim`` (the simulator, model card with startup_s = 0).
Each repetition, for each runtime and N in (1, 8), with fresh model bytes (so every deploy
uploads and every agent downloads, none hits a cache):

bare     the same argv that RUNTIMES[runtime].plan() gives the agent, N child processes
         started at once, each /health polled until 200 (what a person starting the servers
         by hand pays; the floor for the fleet);
deploy   ``deploy_model(v1, replicas=N)`` from call to return: hash, upload, registry, apply,
         placement, a signed command over MQTT, artifact download, supervisor start, health
         probe, telemetry back, and the SDK's own wait (polling every 0.05 s);
rollout  ``deploy_model(v2)`` over the N ready replicas from call to return, then until the old
         replicas are gone; ``rollback.observe_s = 0``: the default canary hold of 30 s would be
         most of it (and llama.cpp exports no latency histogram to judge). The default
         max_surge 1 starts one new replica at a time; for N > 1 a third version is then rolled
         with max_surge N (all at once) to show what the policy costs. The old replicas' drain
         waits at least the agent's drain_delay_s (2 s), even when idle;
delete   ``delete_deployment`` until the deployment is gone (between repetitions).

The deployment's history events (replica_placed, replica_ready, rollout_completed, ...) are
timed against the call, and ``push_model`` alone is timed, to say where the time goes. Ratios
deploy / bare (paired within a repetition) are what to compare between runs: these 2-core
shared machines are noisy.

    python bench/deploy.py [--repeats 5] [--quick] [--runtimes llamacpp,sim]
Writes bench/results/deploy.json (not with --quick) and prints a short table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import llm_ops_helper.client as client_module
from llm_ops_helper.agent.replicas.replica import FIRST_PROBE_S as AGENT_FIRST_PROBE_S
from llm_ops_helper.agent.replicas.replica import POLL_S as AGENT_PROBE_S
from llm_ops_helper.agent.runtimes.registry import RUNTIMES
from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.broker import free_port
from llm_ops_helper.client import LLMOpsHelper, NotFound
from llm_ops_helper.localfleet import LocalFleet
from llm_ops_helper.proto.messages import ReplicaSpec
from llm_ops_helper.tinymodel import write_tiny_llama

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "deploy.json"
SIZES = (1, 8)
AGENTS, GPUS_PER_AGENT, GPU_PROFILE = 2, 4, "a100-sxm4-80gb"
POLL_S = 0.05
TIMEOUT_S = 180.0
NO_CANARY = {"observe_s": 0}
DRAIN_DELAY_S = 2.0  # the agent's supervisor.drain_delay_s default, which LocalFleet keeps


class BenchError(Exception):
    pass


# -- model files ----------------------------------------------------------------------------

def model_file(runtime: str, work: Path, tag: str, version: int) -> Path:
    """Version ``version`` of a model whose bytes no other repetition has (``tag``)."""
    if runtime == "llamacpp":
        return write_tiny_llama(work / f"tiny-{tag}-v{version}.gguf", variant=f"{tag}-{version}")
    # startup_s = 0: the server is ready as soon as it listens; the rest only makes bytes differ.
    return write_model_card(work / f"sim-{tag}-v{version}.toml", startup_s=0.0,
                            ttft_base_ms=20.0 + version, itl_ms=10.0 + 0.001 * len(tag))


# -- the baseline: the same servers started by hand ---------------------------------------------

def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.HTTPError):
        return False


@contextlib.contextmanager
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes, each in a session of its own, all killed (as groups) on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait(10)


def bare_start(runtime: str, model: Path, n: int) -> dict[str, float]:
    """N servers from the agent's own launch plans, started at once: seconds until the first
    and until every one answers /health with 200."""
    plans = [RUNTIMES[runtime].plan(
        ReplicaSpec(name=f"bare-{i}", deployment="bare", version="bare@1", runtime=runtime),
        model_path=model, host="127.0.0.1", port=free_port()) for i in range(n)]
    with children() as procs:
        t0 = time.monotonic()
        for plan in plans:
            procs.append(subprocess.Popen(plan.argv, env={**os.environ, **plan.env},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        ready: dict[int, float] = {}
        while len(ready) < n:
            for i, plan in enumerate(plans):
                if i in ready:
                    continue
                if procs[i].poll() is not None:
                    raise BenchError(f"bare {runtime} server exited with {procs[i].returncode}: "
                                     f"{' '.join(plan.argv)}")
                if _healthy(plan.health_url):
                    ready[i] = time.monotonic() - t0
            if time.monotonic() - t0 > TIMEOUT_S:
                raise BenchError(f"bare {runtime}: {len(ready)}/{n} healthy after {TIMEOUT_S} s")
            time.sleep(POLL_S)
    return {"first_ready_s": min(ready.values()), "all_ready_s": max(ready.values())}


# -- the fleet ----------------------------------------------------------------------------------

def _events_since(fleet: LocalFleet, name: str, t0: float) -> list[dict[str, Any]]:
    events = fleet.get(f"/api/v1/deployments/{name}/history?limit=1000")["events"]
    return [e for e in events if e["ts"] >= t0 - 0.001]


def _at(events: list[dict[str, Any]], t0: float, kinds: tuple[str, ...], *, last: bool = False,
        keep: Callable[[dict[str, Any]], bool] = lambda e: True) -> float | None:
    times = [float(e["ts"]) - t0 for e in events if e["kind"] in kinds and keep(e)]
    if not times:
        return None
    return max(times) if last else min(times)


def wait_until(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not done after {TIMEOUT_S} s")
        time.sleep(POLL_S)


def timed_deploy(helper: LLMOpsHelper, fleet: LocalFleet, name: str, model: Path,
                 n: int) -> dict[str, float | None]:
    t0_wall, t0 = time.time(), time.monotonic()
    d = helper.deploy_model(str(model), name=name, replicas=n, timeout=TIMEOUT_S,
                            rollback=NO_CANARY)
    took = time.monotonic() - t0
    if (d.ready, d.phase) != (n, "available"):
        raise BenchError(f"{name}: returned with {d.ready}/{n} ready, phase {d.phase}")
    ev = _events_since(fleet, name, t0_wall)
    return {"return_s": took,
            "applied_s": _at(ev, t0_wall, ("deployment_applied", "rollout_started")),
            "first_placed_s": _at(ev, t0_wall, ("replica_placed",)),
            "first_ready_s": _at(ev, t0_wall, ("replica_ready",)),
            "all_ready_s": _at(ev, t0_wall, ("replica_ready",), last=True),
            "completed_s": _at(ev, t0_wall, ("rollout_completed",))}


def timed_rollout(helper: LLMOpsHelper, fleet: LocalFleet, name: str, model: Path, n: int,
                  **spec: Any) -> dict[str, float | None]:
    before = {r.name for r in helper.status(name).replicas}
    t0_wall, t0 = time.time(), time.monotonic()
    d = helper.deploy_model(str(model), name=name, replicas=n, timeout=TIMEOUT_S,
                            rollback=NO_CANARY, **spec)
    took = time.monotonic() - t0
    version = d.version

    def drained() -> bool:
        now = helper.status(name).replicas
        return len(now) == n and all(r.version == version for r in now)

    wait_until(f"{name}: old replicas gone", drained)
    gone = time.monotonic() - t0
    ev = _events_since(fleet, name, t0_wall)

    def new(e: dict[str, Any]) -> bool:
        return e["data"].get("replica") not in before

    def old(e: dict[str, Any]) -> bool:
        return e["data"].get("replica") in before

    return {"return_s": took, "drained_s": gone,
            "applied_s": _at(ev, t0_wall, ("rollout_started", "deployment_applied")),
            "first_new_placed_s": _at(ev, t0_wall, ("replica_placed",), keep=new),
            "first_new_ready_s": _at(ev, t0_wall, ("replica_ready",), keep=new),
            "first_old_draining_s": _at(ev, t0_wall, ("replica_draining",), keep=old),
            "completed_s": _at(ev, t0_wall, ("rollout_completed",)),
            "last_old_removed_s": _at(ev, t0_wall, ("replica_removed",), last=True, keep=old)}


def timed_delete(helper: LLMOpsHelper, name: str) -> float:
    t0 = time.monotonic()
    helper.delete_deployment(name)

    def gone() -> bool:
        try:
            helper.status(name)
        except NotFound:
            return True
        return False

    wait_until(f"{name}: deleted", gone)
    return time.monotonic() - t0


def timed_push(helper: LLMOpsHelper, model: Path, name: str) -> float:
    t0 = time.monotonic()
    helper.push_model(str(model), name)
    return time.monotonic() - t0


def run_all(fleet: LocalFleet, work: Path, runtimes: list[str], repeats: int,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Every measurement, in repetition-major order so that the machine's slow spells spread
    over all of them; samples[runtime][n][what] is a list (one per repetition)."""
    helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=POLL_S)
    samples: dict[str, dict[str, dict[str, list[Any]]]] = {
        rt: {f"n{n}": {} for n in SIZES} | {"upload": {"push_s": []}} for rt in runtimes}
    for rt in runtimes:  # warm-up, not counted: the first start of a server reads from disk
        bare_start(rt, model_file(rt, work, "warm", 1), 1)
    for rep in range(repeats):
        for rt in runtimes:
            samples[rt]["upload"]["push_s"].append(
                timed_push(helper, model_file(rt, work, f"push{rep}", 1), f"push-{rt}-{rep}"))
            for n in SIZES:
                tag = f"{rt}-n{n}-{rep}"
                v1, v2 = model_file(rt, work, tag, 1), model_file(rt, work, tag, 2)
                s = samples[rt][f"n{n}"]
                s.setdefault("bare", []).append(bare_start(rt, v1, n))
                s.setdefault("deploy", []).append(timed_deploy(helper, fleet, tag, v1, n))
                s.setdefault("rollout", []).append(timed_rollout(helper, fleet, tag, v2, n))
                if n > 1:  # the same rollout with every new replica started at once
                    v3 = model_file(rt, work, tag, 3)
                    s.setdefault("rollout_surge_all", []).append(
                        timed_rollout(helper, fleet, tag, v3, n, max_surge=n))
                s.setdefault("delete_s", []).append(timed_delete(helper, tag))
                log(f"rep {rep + 1}/{repeats} {rt} N={n}: bare {s['bare'][-1]['all_ready_s']:.2f} s,"
                    f" deploy {s['deploy'][-1]['return_s']:.2f} s, rollout "
                    f"{s['rollout'][-1]['return_s']:.2f} s (old gone "
                    f"{s['rollout'][-1]['drained_s']:.2f} s), delete {s['delete_s'][-1]:.2f} s")
    return samples


# -- summary ------------------------------------------------------------------------------------

def spread(values: list[float | None]) -> dict[str, float] | None:
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3),
            "max": round(max(xs), 3)}


def _fields(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: spread([r[key] for r in rows]) for key in rows[0]}


def summarize(samples: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rt, by_size in samples.items():
        out[rt] = {"upload": {"push_model_s": spread(by_size["upload"]["push_s"])}}
        for n in SIZES:
            s = by_size[f"n{n}"]
            bare = [b["all_ready_s"] for b in s["bare"]]
            deploy = [d["return_s"] for d in s["deploy"]]
            rollout = [r["return_s"] for r in s["rollout"]]
            drained = [r["drained_s"] for r in s["rollout"]]
            out[rt][f"n{n}"] = {
                "bare_s": _fields(s["bare"]),
                "deploy_s": _fields(s["deploy"]),
                "rollout_s": _fields(s["rollout"]),
                **({"rollout_surge_all_s": _fields(s["rollout_surge_all"])}
                   if "rollout_surge_all" in s else {}),
                "delete_s": spread(s["delete_s"]),
                "ratio_deploy_to_bare": {
                    "of_medians": round(statistics.median(deploy) / statistics.median(bare), 2),
                    "paired": spread([d / b for d, b in zip(deploy, bare, strict=True)]),
                },
                "added_by_control_plane_s": spread(
                    [d - b for d, b in zip(deploy, bare, strict=True)]),
                "ratio_rollout_to_bare": round(statistics.median(rollout)
                                               / statistics.median(bare), 2),
                "ratio_rollout_drained_to_bare": round(statistics.median(drained)
                                                       / statistics.median(bare), 2),
                "samples": s,
            }
    return out


def table(results: dict[str, Any]) -> str:
    head = ("runtime", "N", "bare", "deploy", "x bare", "1st ready", "rollout", "old gone",
            "surge N", "delete")
    lines = [f"{head[0]:<9}{head[1]:>3}" + "".join(f"{h:>10}" for h in head[2:])]
    for rt, by_size in results.items():
        for n in SIZES:
            r = by_size[f"n{n}"]
            cells = (r["bare_s"]["all_ready_s"]["median"], r["deploy_s"]["return_s"]["median"],
                     r["ratio_deploy_to_bare"]["of_medians"],
                     (r["deploy_s"]["first_ready_s"] or {}).get("median"),
                     r["rollout_s"]["return_s"]["median"], r["rollout_s"]["drained_s"]["median"],
                     r.get("rollout_surge_all_s", {}).get("return_s", {}).get("median"),
                     r["delete_s"]["median"])
            lines.append(f"{rt:<9}{n:>3}" + "".join(
                f"{'-' if c is None else f'{c:.2f}':>10}" for c in cells))
        lines.append(f"{rt:<9}  push_model alone: "
                     f"{by_size['upload']['push_model_s']['median']:.3f} s (median)")
    lines.append("seconds, medians; deploy and rollout from the deploy_model call to its return "
                 "(max_surge 1), 'old gone' until the old replicas are stopped and forgotten, "
                 "'surge N' the rollout with max_surge N")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or None)
    return {"cores": os.cpu_count(), "cpu": cpu, "arch": platform.machine(),
            "python": platform.python_version()}


def code_version() -> dict[str, Any]:
    """The commit measured and the changes on top of it, from the tree the code that runs
    comes from (the editable install links into this checkout; PYTHONPATH may point elsewhere)."""
    source = Path(client_module.__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        run = subprocess.run(["git", *argv], capture_output=True, text=True, cwd=source)
        return run.stdout.rstrip() if run.returncode == 0 else ""
    changed = git("status", "--porcelain", "--", "agent", "controller", "proto", "sdk")
    return {"source": str(source), "commit": git("rev-parse", "--short", "HEAD") or None,
            "uncommitted": sorted(line[3:] for line in changed.splitlines())}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    runtimes = args.runtimes.split(",")
    for rt in runtimes:
        if (why := RUNTIMES[rt].unavailable()) is not None:
            raise BenchError(f"runtime {rt} cannot run here: {why}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        work = Path(tmp)
        fleet = LocalFleet(work / "fleet", agents_count=AGENTS, gpus_per_agent=GPUS_PER_AGENT,
                           gpu_profile=GPU_PROFILE,
                           controller_overrides={"deployments": {"host_lost_grace_s": 120.0}})
        async with fleet:
            samples = await asyncio.to_thread(run_all, fleet, work, runtimes, args.repeats,
                                              lambda line: print(line, flush=True))
    llama = RUNTIMES["llamacpp"]
    return {
        "benchmark": "deploy",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_version(),
        "runtime": {
            "llamacpp": {"server": getattr(llama, "server_binary", None)
                         or "xllamacpp wheel (llama.cpp's server, CPU)",
                         "xllamacpp": _version("xllamacpp"),
                         "model": "llm_ops_helper.tinymodel (random-weight llama, 2 blocks, "
                                  "about 0.5 MB F32 GGUF)"},
            "sim": {"model_card": "startup_s = 0"},
        },
        "setup": {"agents": AGENTS, "gpus_per_agent": GPUS_PER_AGENT, "gpu_profile": GPU_PROFILE,
                  "gpus_backend": "simulated", "telemetry_interval_s": fleet.interval_s,
                  "sdk_poll_interval_s": POLL_S, "repeats": args.repeats,
                  "replica_counts": list(SIZES), "runtimes": runtimes,
                  "deploy_spec": {"gpus_per_replica": 1, "max_surge": 1, "max_unavailable": 0,
                                  "rollback": NO_CANARY},
                  "agent_drain_delay_s": DRAIN_DELAY_S, "agent_health_probe_s": AGENT_PROBE_S},
        "wall_s": round(time.monotonic() - started, 1),
        "results": summarize(samples),
        "notes": [
            "rollback.observe_s = 0 throughout: with the default canary hold (30 s, after the "
            "first new replica is ready) a rollout takes at least 30 s more than reported here.",
            f"'old gone' includes the agent's drain_delay_s ({DRAIN_DELAY_S:g} s): a draining "
            "replica is stopped no sooner, even when idle; it is a floor on every drain.",
            "Rollouts use the default max_surge 1, max_unavailable 0: one new replica at a time, "
            "each old one drained once a new one is ready, so an N-replica rollout is about N "
            "single-replica starts in a row. rollout_surge_all_s is a third version rolled over "
            "the same N replicas with max_surge N (every new replica started at once).",
            "Every deploy uses model bytes of its own, so each one uploads and each agent "
            "downloads the artifact (no cache hit); the files are small (0.5 MB GGUF, a few "
            "hundred bytes of card), so transfer time is negligible here.",
            "bare: the argv and env of RUNTIMES[runtime].plan(), the agent's own launch plan, "
            "N processes at once, /health polled every 0.05 s; deploy / bare is what the "
            "control plane adds (hash and upload, registry, scheduling, a signed command over "
            "MQTT, artifact download, supervisor start and probes, telemetry back to the "
            "controller, the SDK's polling).",
            "Event times (applied, placed, ready, completed) are from the deployment's history, "
            "stamped by the controller's clock, relative to the deploy_model call; they say "
            "when the controller learned of each step.",
            "The agent probes a starting replica's /health at once, then after gaps that "
            f"start at {AGENT_FIRST_PROBE_S:g} s and grow by half each time up to "
            f"{AGENT_PROBE_S:g} s, so a replica is seen ready at most one gap after its server "
            "is up: a few hundredths of a second for a server up in 0.1 s, "
            f"up to {AGENT_PROBE_S:g} s for one that takes seconds.",
            "All processes (Mosquitto, controller, 2 agents, N replicas, the bench) share this "
            "machine's cores: with 8 llama.cpp servers starting on 2 cores, CPU contention is "
            "a large part of both bare and deploy times; compare ratios between runs.",
        ],
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--repeats", type=int, default=5,
                        help="repetitions of every measurement (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="one repetition, a smoke test; writes no results")
    parser.add_argument("--runtimes", default="llamacpp,sim",
                        help="comma-separated: llamacpp, sim (default both)")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    try:
        result = asyncio.run(measure(args))
    except BenchError as exc:
        sys.exit(f"deploy: FAILED: {exc}")
    if not args.quick:
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {OUT.relative_to(HERE.parent)}")
    print(table(result["results"]))


if __name__ == "__main__":
    main()
