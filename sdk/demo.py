"""``llmops demo``: a whole fleet on this machine, working, in a minute.

A private Mosquitto, the controller (dashboard and API), the ``llmops-gateway`` and three
agents with simulated GPUs (NVML on the first where a driver is present) run as real
processes under a work directory. A tiny model is pushed and deployed with autoscaling on;
chat completions go through the gateway at a rate that rises and falls, so the autoscaler
scales up and back down; one agent's scenario makes a GPU fall off the bus (XID 79), which
the controller raises as an alert. The demo prints where to look and narrates what happens.

Phases, as a daemon: pre-flight (nothing is started if it fails), start-up, run, shutdown.
The first Ctrl-C (or SIGTERM, SIGHUP, or the end of ``--duration``) stops everything in order
and exits 0; a second one SIGKILLs every process the demo started, replicas included, and exits
128 + the signal's number (130 for Ctrl-C) at once. Should the demo itself be killed, its
daemons get SIGTERM from the kernel (parent-death signal) and the agents stop their replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llm_ops_helper.client import LLMOpsError, LLMOpsHelper
from llm_ops_helper.demoload import Load
from llm_ops_helper.demoprep import (
    EX_UNAVAILABLE,
    FAULT_AT_S,
    FAULT_XID,
    PreflightError,
    fault_gpu,
    preflight,
    scenario_text,
    write_model,
)
from llm_ops_helper.demoreap import Reaper, new_run_id
from llm_ops_helper.demowatch import Narrator
from llm_ops_helper.localfleet import LocalFleet

DASHBOARD_PORT = 8470
GATEWAY_PORT = 8480
DEPLOYMENT = "demo-chat"
CYCLE_S = 120.0  # the load's cycle when the demo runs until Ctrl-C
# Under --duration the load's cycle is what is left after start-up: below this, the fall of the
# load and the scale-down window after it may not fit.
MIN_CYCLE_S = 30.0
EXIT_KILLED = 128 + signal.SIGINT
# Tokens per demo request (prompt and answer) as each runtime counts them, measured; the
# capacity per replica is set from it so that one replica serves two requests a second at the
# target utilisation: the trickle (0.4/s) needs one replica, the middle of the rise two and the
# peak (5/s) three, and a scale-down follows the fall of the load within seconds.
TOKENS_PER_REQUEST = {"llamacpp": 22.0, "sim": 13.0}
AUTOSCALE = {"mode": "on", "target_utilization": 0.8, "ttft_slo_s": 5.0, "itl_slo_s": 1.0,
             "scale_down_window_s": 8.0, "queue_per_replica": 4.0, "interval_s": 1.0}


QUICK_SCALE_DOWN_WINDOW_S = 4.0  # under --duration: the scale-down follows the fall sooner


def autoscale_settings(runtime: str, quick: bool = False) -> dict[str, Any]:
    per_replica_rps = 2.0
    capacity = TOKENS_PER_REQUEST.get(runtime, 20.0) * per_replica_rps / 0.8
    window = {"scale_down_window_s": QUICK_SCALE_DOWN_WINDOW_S} if quick else {}
    return {**AUTOSCALE, **window, "capacity_tokens_per_s": capacity}


START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 40.0  # the whole orderly stop; then whatever is left is killed
DAEMON_STOP_S = 8.0  # each daemon, after SIGTERM, before SIGKILL


def describe(exc: BaseException) -> str:
    """One line for an error that ends the demo (the first of a group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    known = (OSError, RuntimeError, TimeoutError, LLMOpsError)
    return str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}"


def _detach_output() -> None:
    """The terminal hung up: later lines go nowhere instead of failing with EIO."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)


class Demo:
    def __init__(self, args: argparse.Namespace, runtime: str, workdir: Path) -> None:
        self.args, self.runtime, self.workdir = args, runtime, workdir
        self.started = time.monotonic()
        self.stop = asyncio.Event()
        self.signals = 0
        self.reaper = Reaper(new_run_id())
        self.fleet = self._fleet()
        self.key = "sk-demo-" + secrets.token_urlsafe(16)

    def say(self, line: str) -> None:
        _print(f"[{time.monotonic() - self.started:6.1f}s] {line}")

    @property
    def fault_host(self) -> str | None:
        """The host whose scenario takes a GPU off the bus: the last one, unless it is the one
        host that may read real GPUs and did (there the scenario does nothing)."""
        host = self.fleet.agents[-1] if self.fleet.agents else None
        if host is None:
            return None
        if len(self.fleet.agents) == 1 and "nvml_unavailable" not in host.daemon.log():
            return None
        return host.host

    def _fleet(self) -> LocalFleet:
        a = self.args
        scenarios = self.workdir / "scenarios"
        scenarios.mkdir(parents=True, exist_ok=True)
        hosts = [f"demo-gpu-{i + 1:02d}" for i in range(a.agents)]
        per_host: dict[str, dict[str, Any]] = {}
        for i, host in enumerate(hosts):
            path = scenarios / f"{host}.toml"
            path.write_text(scenario_text(a.gpus, fault=i == len(hosts) - 1,
                                          period_s=60.0 + 15 * i))
            # The first host reads real GPUs where NVML finds a driver; the others simulate.
            per_host[host] = {"gpus": {"scenario": str(path),
                                       "backend": "auto" if i == 0 else "simulated"}}
        return LocalFleet(
            self.workdir / "fleet", agents_count=a.agents, gpus_per_agent=a.gpus,
            interval_s=1.0, host_prefix="demo-gpu", host_overrides=per_host,
            preferred_http_port=a.port, env=self.reaper.env, parent_death=True,
            controller_overrides={"autoscale": {"interval_s": 1.0, "default_cold_start_s": 5.0}})

    # -- signals ---------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self.signals += 1
        if signum == signal.SIGHUP and sys.stdout.isatty():
            _detach_output()
        if self.signals == 1 and not self.stop.is_set():
            _print("\nstopping (Ctrl-C again to kill everything at once) ...")
            self.stop.set()
            return
        # A second signal, or a first one while --duration's stop is under way: kill now.
        groups = [g for agent in self.fleet.agents for g in agent.replica_groups().values()]
        first = [d.process.pid for d in self.fleet.daemons() if d.process is not None]
        killed = self.reaper.kill_all(first, groups)
        _print(f"killed {killed} processes")
        os._exit(128 + signum)

    async def _until_stopped(self, work: Any) -> bool:
        """Run ``work`` (a coroutine) unless a stop comes first; True if it finished."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False

    async def _remember(self) -> None:
        while True:
            await asyncio.to_thread(self.reaper.remember)  # walks /proc: not on the loop
            await asyncio.sleep(0.5)

    # -- phases ----------------------------------------------------------------------------

    async def _wait_gateway(self) -> None:
        import aiohttp

        url = self.fleet.gateway_url + "/healthz"
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                gateway = self.fleet.gateway
                if gateway is not None and not gateway.running:
                    raise RuntimeError(f"the gateway exited: {gateway.log()[-1500:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise TimeoutError("the gateway did not answer /healthz within 30 s")

    async def _start(self) -> None:
        await self.fleet.start(timeout_s=START_TIMEOUT_S)
        self.fleet.start_gateway({"demo": self.key}, preferred_port=self.args.gateway_port)
        await self._wait_gateway()
        self._banner()
        self.say(f"started    the fleet in {time.monotonic() - self.started:.1f} s")

    def _banner(self) -> None:
        f = self.fleet
        host = self.fault_host
        fault = (f"{host} loses GPU {fault_gpu(self.args.gpus)} (XID {FAULT_XID}) "
                 f"{FAULT_AT_S:g} s after its start" if host is not None else
                 "no GPU fault injected: the only agent reads real GPUs")
        _print(f"""
  dashboard   {f.url}/#token={f.token}
  API token   {f.token}   (admin; also in {f.token_path})
  gateway     {f.gateway_url}/v1   API key {self.key}
  try         curl -s {f.gateway_url}/v1/chat/completions -H 'Authorization: Bearer {self.key}' \\
                -H 'Content-Type: application/json' \\
                -d '{{"model": "{DEPLOYMENT}", "messages": [{{"role": "user", "content": "hi"}}]}}'
  llmops      LLMOPS_URL={f.url} LLMOPS_TOKEN={f.token} llmops top
  logs        {f.workdir}/*.log {f.workdir}/*/*.log {f.workdir}/mosquitto/mosquitto.log
              (e.g. llmops logs {f.workdir}/controller.log)
  fleet       mosquitto :{f.broker.port if f.broker else '?'}, {len(f.agents)} agents x \
{self.args.gpus} GPUs; {fault}
""")

    async def _deploy(self, helper: LLMOpsHelper) -> None:
        model = await asyncio.to_thread(write_model, self.runtime, self.workdir / "model")
        spec: dict[str, Any] = {"min_replicas": 1, "max_replicas": 3,
                                "autoscale": autoscale_settings(
                                    self.runtime, quick=self.args.duration is not None),
                                "drain_timeout_s": 5.0, "rollback": {"observe_s": 0},
                                # What a 7B model in 4 bits holds; simulated GPUs show it used.
                                "gpus_per_replica": 1, "gpu_memory_bytes": 6 * 1024**3}
        await asyncio.to_thread(helper.deploy_model, str(model), name=DEPLOYMENT,
                                runtime=self.runtime, replicas=1, wait=False, **spec)
        self.say(f"pushed     {model.name} and deployed it as {DEPLOYMENT} ({self.runtime}, "
                 f"autoscale on, 1-3 replicas)")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            state = await asyncio.to_thread(helper.status, DEPLOYMENT)
            if state.ready >= 1:
                self.say(f"deployed   version {state.version} ready on "
                         f"{state.replicas[0].host if state.replicas else '?'}")
                return
            if state.phase == "failed":
                raise RuntimeError(f"the deployment failed: {state.message}")
            await asyncio.sleep(0.5)
        raise TimeoutError(f"{DEPLOYMENT} not ready after {START_TIMEOUT_S:g} s")

    async def _serve(self) -> None:
        span = CYCLE_S
        if self.args.duration:
            # One cycle in what is left, so the load has risen and fallen before the end.
            span = max(1.0, self.started + self.args.duration - time.monotonic())
            if span < MIN_CYCLE_S:
                self.say(f"warning    only {span:.0f} s of --duration left after start-up, "
                         f"less than a load cycle ({MIN_CYCLE_S:g} s): scaling may not show; "
                         "run longer")
        load = Load(self.fleet.gateway_url, self.key, DEPLOYMENT, span)
        narrator = Narrator(self.fleet.get, DEPLOYMENT, self.say, self.fault_host)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(load.run(self.stop))
            tasks.create_task(narrator.run(self.stop, load, time.monotonic()))
        self.say(f"load       stopped: {load.ok} requests answered, {load.failed} failed"
                 + (f" (last: {load.last_error})" if load.failed else "")
            + (f", {load.dropped} skipped (too many in flight)" if load.dropped else "")
                 + f"; scaled up {narrator.scaled['up']}x, down {narrator.scaled['down']}x")

    async def _shutdown(self) -> None:
        self.say("stopping   gateway, agents (and their replicas), controller, broker")
        try:
            await asyncio.wait_for(self.fleet.stop(DAEMON_STOP_S), STOP_TIMEOUT_S)
        except TimeoutError:
            self.say(f"warning    the orderly stop took over {STOP_TIMEOUT_S:g} s")
        except Exception as exc:  # whatever it was, the kill below follows
            self.say(f"warning    the orderly stop failed: {describe(exc)}")
        finally:
            # In a thread: a second Ctrl-C is handled at once meanwhile.
            left = await asyncio.to_thread(self.reaper.alive)
            if left:
                self.say(f"warning    {len(left)} processes outlived the stop; killing them")
                await asyncio.to_thread(self.reaper.kill_all)
        self.say(f"stopped    logs are in {self.fleet.workdir}")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, self._on_signal, signum)
        if self.args.duration:
            loop.call_later(self.args.duration, self.stop.set)
        remember = asyncio.create_task(self._remember())
        code = 0
        try:
            self.say(f"starting   mosquitto, controller, gateway, {self.args.agents} agents "
                     f"(work directory {self.workdir})")
            if await self._until_stopped(self._start()):
                helper = LLMOpsHelper(self.fleet.url, token=self.fleet.token,
                                      poll_interval=0.5)
                if await self._until_stopped(self._deploy(helper)):
                    await self._serve()
        except Exception as exc:  # one line, not a traceback; the logs have more
            _print(f"llmops demo: {describe(exc)}", sys.stderr)
            code = 1
        finally:
            try:
                await self._shutdown()
            finally:
                remember.cancel()
        return code


def _print(line: str, stream: Any = None) -> None:
    """Print and flush; a terminal gone (EIO) or a closed pipe does not stop the demo."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=stream or sys.stdout, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    """``llmops demo``: pre-flight, then the demo; the exit code."""
    args.port = DASHBOARD_PORT if args.port is None else args.port
    args.gateway_port = GATEWAY_PORT if args.gateway_port is None else args.gateway_port
    if args.agents < 1 or args.gpus < 1 or (args.duration is not None and args.duration <= 0):
        print("llmops demo: --agents and --gpus must be at least 1, --duration above 0",
              file=sys.stderr)
        return 2
    try:
        checked = preflight(args.runtime)
    except PreflightError as exc:
        print(f"llmops demo: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_KILLED
    # Absolute: the agents' configs name directories under it, and they run elsewhere.
    workdir = Path(args.workdir).resolve() if args.workdir else Path(
        tempfile.mkdtemp(prefix="llmops-demo-"))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        # A Ctrl-C before the demo's own handlers are in place: nothing runs yet.
        return asyncio.run(Demo(args, checked.runtime, workdir).run())
    except KeyboardInterrupt:
        return EXIT_KILLED
    except OSError as exc:
        print(f"llmops demo: {exc}", file=sys.stderr)
        return 1
